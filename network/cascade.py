"""Recursive application of the network: register, warp, register the warped pair again, compose.

A coarse pass (:func:`coarse_pass`) may come first: the same network on
the pair at half resolution, for the large, smooth part of the motion that
one full-resolution pass does not reach (the network's capture range, in
voxels, doubles in millimetres).

Pass k sees the fixed image and the moving image warped by passes 1..k-1,
and predicts a velocity ``v_k`` for what is left. With ``phi_k(x) = x + u_k(x)``,
``u_k`` the integral of ``v_k``, the whole transform is the composition
``phi = phi_1 o phi_2 o ... o phi_n`` (pull-back: ``warped(x) = moving(phi(x))``);
a composition of diffeomorphisms is one, and its inverse is
``phi_n^-1 o ... o phi_1^-1``, each ``phi_k^-1`` the integral of ``-v_k``.

Each pass's velocity is integrated where it lives: a full-resolution pass's
at half resolution, the coarse pass's at quarter resolution (an eighth of
the work again), then brought to half resolution; the passes' fields are
composed there and brought to full resolution once (a trilinear upsampling,
as :func:`~lumireg.network.model.velocity_to_displacement` does for one
pass). Composing two full-resolution fields costs eight times as much and
differs from it only by interpolation: on the bundled network's fields,
0.003-0.006 voxels on average (validation pairs; Dice the same to 0.001).
Each pass after the first sees the moving image resampled by the
full-resolution field of the passes before it.

Conventions: images ``(B, 1, D, H, W)``; velocities ``(B, 3, D/2, H/2, W/2)``
in half-resolution voxels (the coarse pass's ``(B, 3, D/4, H/4, W/4)`` in
quarter-resolution voxels); displacements ``(B, 3, D, H, W)`` float32 in
voxels, pull-back from the fixed grid, channel c along array axis c.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lumireg.contract import INTEGRATION_STEPS, SIZE_MULTIPLE
from lumireg.kernels import integrate, warp
from lumireg.network.model import half_to_full


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> y + outer(y)`` at ``y = x + inner(x)``: ``inner + outer(x + inner(x))``.

    ``warp(warp(image, outer), inner) == warp(image, compose(outer, inner))`` up to
    interpolation. Both ``(B, 3, D, H, W)`` in voxels; ``outer`` is sampled
    trilinearly with border padding (a field continues past the edge, it does not drop to 0).
    """
    return inner + warp(outer, inner, padding="border")


def _in_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float ``values`` in ``dtype``: integers rounded and clipped to their range."""
    if dtype.is_floating_point:
        return values.to(dtype)
    info = torch.iinfo(dtype)
    return values.round_().clamp_(info.min, info.max).to(dtype)


def resample_like(moving: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``moving`` warped by ``displacement``, in ``moving``'s dtype (integers rounded and clipped to their range)."""
    return _in_dtype(warp(moving.float(), displacement), moving.dtype)


def halve(image: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D, H, W)`` -> ``(B, 1, D/2, H/2, W/2)``: means of 2x2x2 blocks, in ``image``'s dtype."""
    return _in_dtype(F.avg_pool3d(image.float(), 2), image.dtype)


def coarse_pass(
    network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``network`` applied to the pair at half resolution, as a pass of the full-resolution pair.

    Both images are halved (means of 2x2x2 blocks; on the canvas 80 x 112 x 96, an eighth of the voxels, so an
    eighth of a pass's work; the moving image may come halved already, as
    :func:`lumireg.network.align.resample_half` makes the aligned one) and, where a halved size is no multiple of
    :data:`~lumireg.contract.SIZE_MULTIPLE`, set in the middle of a zero volume of the next multiple (background,
    as around a brain). The velocity the network finds for them lives on a grid of 4-voxel steps, in units of 4
    voxels: the part under the halved images is the pair's quarter-resolution velocity. D, H, W must be divisible
    by 4.

    Returns:
        ``(fixed, moving) -> velocity``: ``(B, 3, D/4, H/4, W/4)`` quarter-resolution voxels (:func:`cascade`
        integrates it there and brings the field to half resolution).
    """

    def run(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        shape = fixed.shape[2:]
        if any(n % 4 for n in shape):
            raise ValueError(f"a coarse pass needs D, H, W divisible by 4, got {tuple(shape)}")
        half = [n // 2 for n in shape]
        framed = [-(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE for h in half]
        start = [(f - h) // 4 * 2 for f, h in zip(framed, half)]  # even, so the velocity grid splits it exactly
        inner = tuple(slice(s, s + h) for s, h in zip(start, half))

        def halved(image):
            if tuple(image.shape[2:]) != tuple(half):  # not yet halved (an aligned image may come halved)
                image = halve(image)
            if framed == half:
                return image
            out = image.new_zeros((*image.shape[:2], *framed))
            out[(..., *inner)] = image
            return out

        velocity = network(halved(fixed), halved(moving)).float()
        return velocity[(..., *[slice(s // 2, (s + h) // 2) for s, h in zip(start, half)])]

    return run


def _integrated(velocity: torch.Tensor, half: Sequence[int], steps: int) -> torch.Tensor:
    """The displacement of ``velocity`` (half- or quarter-resolution, :func:`coarse_pass`), integrated on its own
    grid, on the half-resolution grid ``half`` in half-resolution voxels."""
    step = integrate(velocity, steps)
    return step if tuple(step.shape[2:]) == tuple(half) else half_to_full(step)


def cascade(
    network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fixed: torch.Tensor,
    moving: torch.Tensor,
    passes: int,
    steps: int = INTEGRATION_STEPS,
    refine_last: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    coarse: int = 0,
    matrix: torch.Tensor | None = None,
    aligned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``network`` ``passes`` times, each on the moving image warped by the passes before it.

    Args:
        network: ``(fixed, moving) -> velocity`` (``(B, 3, D/2, H/2, W/2)``, half-resolution voxels),
            taking images of ``fixed``'s dtype (uint8 for the served graph, 0..1 floats for :class:`LumiNet`).
        fixed, moving: ``(B, 1, D, H, W)``, one device and dtype.
        passes: >= 1 full-resolution passes; 1 is the network alone.
        steps: scaling-and-squaring steps.
        refine_last: ``(fixed, moving_seen, velocity) -> velocity``, applied to the last pass's
            velocity (``moving_seen``: the moving image that pass saw), e.g. :func:`lumireg.network.refine.refine`.
        coarse: 0, or 1 for a :func:`coarse_pass` before the full-resolution passes.
        matrix: ``(B, 4, 4)`` pull-back affine in voxels (:func:`lumireg.network.align.estimate`) the passes start
            from: the whole transform is ``x -> M (x + u(x))``, and every pass after the first sees ``moving``
            resampled once through it and the passes before, not an aligned copy resampled again.
        aligned: ``moving`` already resampled through ``matrix`` (the first pass's input), when the caller has it;
            halved (:func:`lumireg.network.align.resample_half`) when the first pass is the coarse one.

    Returns:
        ``(displacement, velocities)``: the composed ``(B, 3, D, H, W)`` float32
        pull-back displacement (voxels; with ``matrix``, the affine's too) and the ``coarse + passes``
        velocities in order (for :func:`cascade_inverse`).
    """
    if passes < 1 or coarse not in (0, 1):
        raise ValueError(f"passes must be >= 1 and coarse 0 or 1, got {passes} and {coarse}")
    # the affine's module resamples with this one's resample_like: imported here, not at the top
    from lumireg.network.align import compose_with, resample

    def whole(half: torch.Tensor) -> torch.Tensor:
        """The full-resolution displacement of the passes composed in ``half``, then the affine (if any)."""
        full = half_to_full(half)
        return full if matrix is None else compose_with(matrix, full)

    if matrix is None:
        first = moving
    else:
        first = resample(moving, matrix) if aligned is None else aligned
    half, velocities = None, []  # the passes so far, composed: half-resolution displacement (half-res voxels)
    schedule = [coarse_pass(network)] * coarse + [network] * passes
    for index, run in enumerate(schedule):
        seen = first if half is None else resample_like(moving, whole(half))
        velocity = run(fixed, seen).float()
        if refine_last is not None and index == len(schedule) - 1:
            velocity = refine_last(fixed, seen, velocity)
        velocities.append(velocity)
        step = _integrated(velocity, [n // 2 for n in fixed.shape[2:]], steps)
        half = step if half is None else compose(half, step)
    return whole(half), velocities


def cascade_inverse(velocities: list[torch.Tensor], steps: int = INTEGRATION_STEPS) -> torch.Tensor:
    """The inverse of :func:`cascade`'s transform, ``(B, 3, D, H, W)`` voxels: pulls fixed onto the moving grid."""
    inverse = integrate(-velocities[-1], steps)  # the last is a full-resolution pass's: the half-resolution grid
    for velocity in reversed(velocities[:-1]):
        inverse = compose(inverse, _integrated(-velocity, inverse.shape[2:], steps))
    return half_to_full(inverse)
