"""Local normalised cross-correlation (placeholder until the NCC op lands)."""


def local_ncc(fixed, moving, window=9, backend="auto"):
    raise NotImplementedError
