"""Recursive application of the network: register, warp, register the warped pair again, compose.

Pass k sees the fixed image and the moving image warped by passes 1..k-1,
and predicts a velocity ``v_k`` for what is left. With ``phi_k(x) = x + u_k(x)``,
``u_k`` the integral of ``v_k``, the whole transform is the composition
``phi = phi_1 o phi_2 o ... o phi_n`` (pull-back: ``warped(x) = moving(phi(x))``);
a composition of diffeomorphisms is one, and its inverse is
``phi_n^-1 o ... o phi_1^-1``, each ``phi_k^-1`` the integral of ``-v_k``.

Conventions: images ``(B, 1, D, H, W)``; velocities ``(B, 3, D/2, H/2, W/2)``
in half-resolution voxels; displacements ``(B, 3, D, H, W)`` float32 in
voxels, pull-back from the fixed grid, channel c along array axis c.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lumireg.contract import INTEGRATION_STEPS
from lumireg.kernels import warp
from lumireg.network.model import velocity_to_displacement


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> y + outer(y)`` at ``y = x + inner(x)``: ``inner + outer(x + inner(x))``.

    ``warp(warp(image, outer), inner) == warp(image, compose(outer, inner))`` up to
    interpolation. Both ``(B, 3, D, H, W)`` in voxels; ``outer`` is sampled
    trilinearly with border padding (a field continues past the edge, it does not drop to 0).
    """
    return inner + warp(outer, inner, padding="border")


def resample_like(moving: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``moving`` warped by ``displacement``, in ``moving``'s dtype (integers rounded and clipped to their range)."""
    warped = warp(moving.float(), displacement)
    if moving.dtype.is_floating_point:
        return warped.to(moving.dtype)
    info = torch.iinfo(moving.dtype)
    return warped.round_().clamp_(info.min, info.max).to(moving.dtype)


def cascade(
    network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fixed: torch.Tensor,
    moving: torch.Tensor,
    passes: int,
    steps: int = INTEGRATION_STEPS,
    refine_last: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``network`` ``passes`` times, each on the moving image warped by the passes before it.

    Args:
        network: ``(fixed, moving) -> velocity`` (``(B, 3, D/2, H/2, W/2)``, half-resolution voxels),
            taking images of ``fixed``'s dtype (uint8 for the served graph, 0..1 floats for :class:`LumiNet`).
        fixed, moving: ``(B, 1, D, H, W)``, one device and dtype.
        passes: >= 1; 1 is the network alone.
        steps: scaling-and-squaring steps.
        refine_last: ``(fixed, moving_seen, velocity) -> velocity``, applied to the last pass's
            velocity (``moving_seen``: the moving image that pass saw), e.g. :func:`lumireg.network.refine.refine`.

    Returns:
        ``(displacement, velocities)``: the composed ``(B, 3, D, H, W)`` float32
        pull-back displacement (voxels) and the ``passes`` velocities in order
        (for :func:`cascade_inverse`).
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    displacement, velocities = None, []
    for index in range(passes):
        seen = moving if displacement is None else resample_like(moving, displacement)
        velocity = network(fixed, seen).float()
        if refine_last is not None and index == passes - 1:
            velocity = refine_last(fixed, seen, velocity)
        velocities.append(velocity)
        step = velocity_to_displacement(velocity, steps)
        displacement = step if displacement is None else compose(displacement, step)
    return displacement, velocities


def cascade_inverse(velocities: list[torch.Tensor], steps: int = INTEGRATION_STEPS) -> torch.Tensor:
    """The inverse of :func:`cascade`'s transform, ``(B, 3, D, H, W)`` voxels: pulls fixed onto the moving grid."""
    inverse = velocity_to_displacement(-velocities[-1], steps)
    for velocity in reversed(velocities[:-1]):
        inverse = compose(inverse, velocity_to_displacement(-velocity, steps))
    return inverse
