"""Package data made by the synthetic generator, and the functions that make it again.

``export/parity_pair.npz``: the realistic pair of the export's parity check
(:func:`lumireg.export.onnx.template_pair`). Serving must not import training
code, so the pair is a file: held-out synthetic pair ``evaluation_seeds(1)[0]``
(:mod:`lumireg.train.synthetic`) at half the canvas's resolution
(:data:`lumireg.contract.HALF_CANVAS`, 2 mm voxels: about a seventh of the bytes
of a full-canvas pair after compression), in LUMIR's uint8 intensities. After a change to
the generator, write it again::

    python -m lumireg.train.fixtures export/parity_pair.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lumireg.contract import HALF_CANVAS, NETWORK_INPUT_NAMES, intensities_to_uint8
from lumireg.train.synthetic import evaluation_seeds, synthetic_pair


def parity_pair() -> dict[str, np.ndarray]:
    """``{"fixed", "moving"}``: ``uint8 (1, 1, 80, 112, 96)`` (:data:`~lumireg.contract.HALF_CANVAS`, 2 mm)."""
    sample = synthetic_pair(evaluation_seeds(1)[0], shape=HALF_CANVAS, labels=False)
    return {name: intensities_to_uint8(sample[name].numpy())[None] for name in NETWORK_INPUT_NAMES}


def write_parity_pair(path: str | Path) -> Path:
    """Write :func:`parity_pair` to ``path`` as a compressed ``.npz`` (arrays ``fixed`` and ``moving``)."""
    path = Path(path)
    with path.open("wb") as handle:
        np.savez_compressed(handle, **parity_pair())
    return path


if __name__ == "__main__":
    print(write_parity_pair(sys.argv[1] if len(sys.argv) > 1 else "export/parity_pair.npz"))
