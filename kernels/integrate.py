"""Scaling and squaring: the displacement of the flow of a stationary velocity field.

``u = v / 2**steps``, then ``steps`` times ``u = u + warp(u, u)`` (trilinear,
zero padding), as VoxelMorph's ``VecInt``. Each squaring step is one launch of
the fused warp kernel in residual mode: every voxel reads its own three
components, samples all three at once from the 8 neighbours, and writes
``u + sample``. The first launch also does the scaling (``s v + warp(s v, s v)``,
``s = 2**-steps``), so the forward is ``steps`` launches and the backward
``steps`` more (plus two elementwise torch adds per step). ``integrate(-v)``
is the inverse transform.

On a GPU the backward's atomic adds (see :mod:`lumireg.kernels.warp`) make the
gradient vary in its last bits between identical runs; the forward is deterministic.
"""

from __future__ import annotations

import torch

from lumireg.contract import INTEGRATION_STEPS
from lumireg.kernels._dispatch import check_volume, compute_dtype, use_triton
from lumireg.kernels.warp import warp_backward, warp_forward, warp_torch


class SquaringStep(torch.autograd.Function):
    """``u + warp(u, u)`` of ``u = scale * v`` on the Triton kernels; saves only ``v``."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.scale = scale
        return warp_forward(v, v, residual=True, scale=scale, op="integrate")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (v,) = ctx.saved_tensors
        # v is both the image sampled and the displacement sampling it; the kernel applies the scale to both
        grad_image, grad_disp = warp_backward(grad_out, v, v, scale=ctx.scale, op="integrate")
        return torch.add(grad_image, grad_out, alpha=ctx.scale).add_(grad_disp), None


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
        (float64 for float64 input), differentiable in ``velocity``. On a GPU
        its gradient is not bitwise reproducible (atomic adds).
    """
    check_volume("velocity", velocity, channels=3)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    u = velocity.to(compute_dtype(velocity))
    if use_triton(backend, velocity):
        for step in range(steps):
            # 2**-steps is exact in float32, as the kernel receives it
            u = SquaringStep.apply(u, 2.0**-steps if step == 0 else 1.0)
        return u
    u = u / 2**steps
    for _ in range(steps):
        u = u + warp_torch(u, u)
    return u
