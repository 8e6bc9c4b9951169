"""Training data: one sample format for synthetic and LUMIR pairs, and random crops of it.

A sample is a dict: ``"fixed"`` and ``"moving"``, ``(1, D, H, W)`` float32 in
0..1 (LUMIR's 0..255 intensities / 255; axes i, j, k of the NIfTI array);
optionally ``"fixed_labels"`` and ``"moving_labels"``, ``(1, D, H, W)`` int32;
plus identifying entries that are not volumes (``"seed"``, ``"fixed_path"``, ...).
A :class:`torch.utils.data.DataLoader` batches them into ``(B, 1, D, H, W)``.

Sources: :class:`SyntheticPairs` (the MNI template warped by random
diffeomorphisms; ``lumireg.train.synthetic``) and :class:`LumirPairs` (the
LUMIR dataset JSON; ``lumireg.train.lumir``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lumireg.contract import SIZE_MULTIPLE, check_size_multiple
from lumireg.train.canvas import LABELS, Canvas, lumir_canvas
from lumireg.train.lumir import LumirPairs
from lumireg.train.synthetic import (
    EVAL_SEED_START,
    PRESETS,
    SyntheticConfig,
    SyntheticPairs,
    evaluation_seeds,
    random_displacement,
    synthetic_pair,
    training_seeds,
)

__all__ = [
    "EVAL_SEED_START",
    "LABELS",
    "Canvas",
    "LumirPairs",
    "PRESETS",
    "SyntheticConfig",
    "SyntheticPairs",
    "evaluation_seeds",
    "lumir_canvas",
    "random_crop",
    "random_displacement",
    "synthetic_pair",
    "training_seeds",
]


def _is_volume(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4


def random_crop(sample: dict, size: Sequence[int], generator: torch.Generator | None = None) -> dict:
    """Cut one random window, the same for every volume of ``sample``.

    Args:
        sample: a sample dict (see the module docstring); every ``(C, D, H, W)``
            tensor in it is cropped, other entries are passed through.
        size: ``(d, h, w)`` of the window in voxels, each a positive multiple of
            16 (the network's downsampling) and at most the volume's size.
        generator: source of the window's corner (uniform over all positions).

    Returns:
        A new dict; cropped volumes are contiguous copies (never views), so the full volumes
        can be freed (and a DataLoader does not ship them between processes).
    """
    volumes = {k: v for k, v in sample.items() if _is_volume(v)}
    shapes = {tuple(v.shape[1:]) for v in volumes.values()}
    if len(shapes) != 1:
        raise ValueError(f"the sample's volumes must share one spatial shape, got {sorted(shapes)}")
    (shape,) = shapes
    size = tuple(int(s) for s in size)
    if len(size) != 3 or any(s > n for s, n in zip(size, shape)):
        raise ValueError(f"crop size must be 3 positive multiples of {SIZE_MULTIPLE} within {shape}, got {size}")
    check_size_multiple(size, "crop size")
    start = [int(torch.randint(0, n - s + 1, (), generator=generator)) for n, s in zip(shape, size)]
    window = (slice(None),) + tuple(slice(a, a + s) for a, s in zip(start, size))
    return {k: v[window].clone(memory_format=torch.contiguous_format) if k in volumes else v for k, v in sample.items()}
