"""Pairs of different contrasts: map the moving image's intensities to the fixed image's contrast.

The network was trained on pairs of one contrast; between a T1 and a T2 image
(CSF bright, white matter dark) it aligns the wrong edges. Guimond et al.
(2001, "Three-dimensional multimodal brain warping using the demons algorithm
and adaptive intensity corrections") map one image's intensities to the
other's with the joint histogram: each moving intensity ``m`` becomes
``E[F | M = m]``, the mean fixed intensity where the moving image has ``m``,
and re-estimate the map once the images are closer. :func:`intensity_map`
estimates that map (a 256-entry look-up table per pair) from the voxels where
either image is nonzero, smoothed over neighbouring intensities so sparse
bins do not jump; background (0) stays 0.

Conventions: images ``uint8 (B, 1, D, H, W)`` (LUMIR intensities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = 256
SMOOTH_LEVELS = 2.0  # Gaussian sigma of the map's smoothing, in intensity levels


def intensity_map(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """The look-up table taking ``moving``'s intensities to ``fixed``'s contrast, ``(B, 256)`` uint8.

    Args:
        fixed, moving: ``uint8 (B, 1, D, H, W)`` on one grid and device.

    Returns:
        ``table[b, m]`` = the smoothed mean of ``fixed[b]`` over the voxels where
        ``moving[b] == m`` (``0`` for ``m = 0``); a level that never occurs takes
        its neighbours' value through the smoothing.
    """
    if fixed.dtype != torch.uint8 or moving.dtype != torch.uint8 or fixed.shape != moving.shape:
        raise ValueError(f"fixed and moving must be uint8 of one shape, got {fixed.dtype} {moving.dtype}")
    radius = int(4 * SMOOTH_LEVELS)
    offsets = torch.arange(-radius, radius + 1, device=fixed.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / SMOOTH_LEVELS) ** 2).view(1, 1, -1)
    tables = []
    for f, m in zip(fixed.flatten(1).long(), moving.flatten(1).long()):
        either = (f > 0) | (m > 0)
        f, m = f[either], m[either]
        counts = torch.bincount(m, minlength=LEVELS).double()
        sums = torch.bincount(m, weights=f.double(), minlength=LEVELS)
        counts, sums = (F.conv1d(x.view(1, 1, -1), kernel, padding=radius).view(-1) for x in (counts, sums))
        table = torch.where(counts > 1e-6, sums / counts.clamp_min(1e-6), torch.zeros_like(sums))
        table[0] = 0
        tables.append(table.round().clamp(0, LEVELS - 1).to(torch.uint8))
    return torch.stack(tables)


def apply_map(table: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``image`` (``uint8 (B, 1, D, H, W)``) with each pair's intensities looked up in ``table`` (``(B, 256)``)."""
    return torch.stack([t[i.long()] for t, i in zip(table, image)])
