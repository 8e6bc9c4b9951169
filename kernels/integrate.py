"""Scaling and squaring: the displacement of the flow of a stationary velocity field.

``u = v / 2**steps``, then ``steps`` times ``u = u + warp(u, u)`` (trilinear,
zero padding), as VoxelMorph's ``VecInt``. Each squaring step is one launch of
the fused warp kernel in residual mode: every voxel reads its own three
components, samples all three at once from the 8 neighbours, and writes
``u + sample``. ``integrate(-v)`` is the inverse transform.
"""

from __future__ import annotations

import torch

from lumireg.contract import INTEGRATION_STEPS
from lumireg.kernels._dispatch import check_volume, compute_dtype, use_triton
from lumireg.kernels.warp import warp_backward, warp_forward, warp_torch


class SquaringStep(torch.autograd.Function):
    """``u + warp(u, u)`` on the Triton kernels; saves only ``u``."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        return warp_forward(u, u, residual=True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        # u is both the image sampled and the displacement sampling it
        grad_image, grad_disp = warp_backward(grad_out, u, u)
        return grad_out + grad_image + grad_disp


def integrate(velocity: torch.Tensor, steps: int = INTEGRATION_STEPS, backend: str = "auto") -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    Args:
        velocity: ``(B, 3, D, H, W)`` stationary velocity in voxel units,
            channel k along array axis k (any float dtype).
        steps: number of squarings (default :data:`lumireg.contract.INTEGRATION_STEPS`, LUMIR's 7);
            0 returns the velocity.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``lumireg.kernels``).

    Returns:
        ``(B, 3, D, H, W)`` pull-back displacement in voxel units, float32
        (float64 for float64 input), differentiable in ``velocity``.
    """
    check_volume("velocity", velocity, channels=3)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    triton_path = use_triton(backend, velocity)
    u = velocity.to(compute_dtype(velocity)) / 2**steps
    for _ in range(steps):
        u = SquaringStep.apply(u) if triton_path else u + warp_torch(u, u)
    return u
