"""Training losses, per sample, in the kernels' conventions: images ``(B, 1, D, H, W)`` in 0..1."""

from __future__ import annotations

import torch

from lumireg.contract import NCC_WINDOW
from lumireg.kernels import local_ncc
from lumireg.kernels import mutual_information as kernels_mutual_information


def ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = NCC_WINDOW) -> torch.Tensor:
    """``-local_ncc``: ``(B,)``, in [-1, 0]; VoxelMorph's NCC loss on the fused kernels."""
    return -local_ncc(fixed, warped, window)


def mutual_information(fixed: torch.Tensor, moving: torch.Tensor, bins: int = 32, sigma: float = 0.5) -> torch.Tensor:
    """Parzen-window mutual information in nats, ``(B,)``, for cross-contrast pairs.

    Intensities are expected in 0..1. Each voxel spreads over ``bins`` equally
    spaced bin centres with Gaussian weights of width ``sigma`` bin spacings
    (normalised per voxel); the joint histogram is the mean outer product of the
    two images' weights. Differentiable in both images. Runs
    :func:`lumireg.kernels.mutual_information` (Triton on CUDA tensors).
    """
    return kernels_mutual_information(fixed, moving, bins, sigma)


def mi_loss(fixed: torch.Tensor, warped: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """``-mutual_information``: ``(B,)``."""
    return -mutual_information(fixed, warped, bins)
