"""Instance optimisation: refine the network's velocity for one pair by gradient descent (request parameter ``refine``).

Starting from the network's stationary velocity ``v`` (half-resolution voxels,
:func:`lumireg.network.model.velocity_to_displacement`'s convention), Adam
minimises, per pair,

    - S(F, M o exp(v)) / 2 - S(M, F o exp(-v)) / 2 + smooth_weight * |grad v|^2

over ``v = v_net + up(w)``: the update ``w`` lives on a grid :data:`UPDATE_SPACING`
velocity voxels apart (8 mm) and is upsampled trilinearly onto the velocity's
grid, so every Adam step moves the field smoothly. Adam moves each free element
by about its learning rate whatever its gradient's size: free on the velocity's
own grid, 20 steps followed the similarity's noise and lowered the Dice of
validation T1/T2 pairs that the 8 mm grid raised (README, "Benchmarks"). The
images are at half resolution (2 x 2 x 2 means, the velocity's own grid),
with ``S`` the local NCC (window :data:`lumireg.contract.HALF_NCC_WINDOW`, about the
same 9 mm of brain as the training loss's 9 voxels at 1 mm) or the mutual information
(:func:`lumireg.kernels.mutual_information`, for pairs of different
contrasts). The result is a velocity again, integrated by scaling and squaring
like the network's, so the field stays diffeomorphic and ``exp(-v)`` stays its
exact inverse. The integration, the warps and the similarities in the loop are
:mod:`lumireg.kernels` ops with their autograd: the Triton kernels on a GPU,
their PyTorch twins on a CPU; the update's upsampling and the smoothness term
are plain PyTorch (a few small elementwise passes over the velocity).

A pair whose similarity ends no better than the network's (or not finite)
keeps the network's velocity and is reported as not converged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lumireg.contract import HALF_NCC_WINDOW, INTEGRATION_STEPS
from lumireg.kernels import integrate, local_ncc, mutual_information, warp

SIMILARITIES = ("ncc", "mi")
MI_BINS = 32
# Adam, in half-resolution voxels per step; chosen with UPDATE_SPACING on validation T1/T2 pairs outside every
# held-out set (README, "Benchmarks"): MI's global histogram gives a noisier gradient than the local NCC
LEARNING_RATES = {"ncc": 0.1, "mi": 0.05}
UPDATE_SPACING = 4  # velocity voxels between the update's grid points (8 mm at 1 mm images)
SMOOTH_WEIGHT = 1.0  # times the mean squared forward difference of v, the training loss's regulariser


def half_resolution(image: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D, H, W)`` 0..255 (any dtype) -> ``(B, 1, D/2, H/2, W/2)`` float32 0..1, 2 x 2 x 2 means.

    The means' centres sit where :func:`~lumireg.network.model.velocity_to_displacement`
    puts the velocity's voxels (trilinear x2 upsampling, ``align_corners=False``).
    """
    return F.avg_pool3d(image.float() / 255, 2)


def _similarity(name: str, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    if name == "ncc":
        return local_ncc(fixed, moving, HALF_NCC_WINDOW)
    return mutual_information(fixed, moving, MI_BINS)


def smoothness(field: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward difference of ``(B, 3, D, H, W)`` over the 3 axes, ``(B,)``.

    Units: squared field units per squared voxel (the field's own voxels). The training loss's and refinement's.
    """
    return sum(field.diff(dim=axis).pow(2).flatten(1).mean(1) for axis in (2, 3, 4)) / 3.0


def symmetric_similarity(
    velocity: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, similarity: str, steps: int
) -> torch.Tensor:
    """``(S(F, M o exp(v)) + S(M, F o exp(-v))) / 2`` per pair, ``(B,)``; images from :func:`half_resolution`."""
    forward, backward = integrate(velocity, steps), integrate(-velocity, steps)
    return (
        _similarity(similarity, fixed, warp(moving, forward)) + _similarity(similarity, moving, warp(fixed, backward))
    ) / 2


def refine(
    velocity: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    iterations: int,
    similarity: str = "ncc",
    *,
    steps: int = INTEGRATION_STEPS,
    learning_rate: float | None = None,
    smooth_weight: float = SMOOTH_WEIGHT,
) -> tuple[torch.Tensor, list[dict]]:
    """Refine ``velocity`` for the pair (``fixed``, ``moving``) by ``iterations`` Adam steps.

    Args:
        velocity: ``(B, 3, D/2, H/2, W/2)`` float32, half-resolution voxels (the network's output).
        fixed, moving: ``(B, 1, D, H, W)``, 0..255 (uint8 as served, or float), on the velocity's device.
        iterations: optimisation steps (0 returns ``velocity`` as is, with no reports).
        similarity: ``"ncc"`` or ``"mi"``; across contrasts the service passes the moving image mapped to the
            fixed image's contrast (:mod:`lumireg.network.contrast`), where NCC did best on held-out pairs.
        steps: scaling-and-squaring steps (the network's).
        learning_rate: Adam's, half-resolution voxels per step (default: :data:`LEARNING_RATES` of ``similarity``).
        smooth_weight: the smoothness term's weight, on the whole refined velocity.

    Returns:
        ``(velocity, reports)``: the refined velocity (same shape, float32, no grad) and one
        dict per pair: ``steps``, ``similarity``, ``before`` / ``after`` (the symmetric
        similarity at half resolution, NCC in [0, 1] or MI in nats), ``converged``.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    if iterations == 0:
        return velocity, []
    # a caller's inference_mode or no_grad must not stop the optimisation: fresh tensors, grad on
    with torch.inference_mode(False), torch.enable_grad():
        start = velocity.detach().float().clone()
        fixed, moving = half_resolution(fixed.clone()), half_resolution(moving.clone())
        if fixed.shape[2:] != start.shape[2:]:
            raise ValueError(
                f"velocity {tuple(start.shape)} is not on the half-resolution grid of {tuple(fixed.shape)}"
            )
        size = start.shape[2:]
        update = start.new_zeros((*start.shape[:2], *(-(-n // UPDATE_SPACING) for n in size))).requires_grad_(True)
        rate = LEARNING_RATES[similarity] if learning_rate is None else learning_rate
        optimiser = torch.optim.Adam([update], lr=rate)

        def refined_velocity() -> torch.Tensor:
            return start + F.interpolate(update, size=size, mode="trilinear", align_corners=False)

        for _ in range(iterations):
            optimiser.zero_grad(set_to_none=True)
            current = refined_velocity()
            loss = smooth_weight * smoothness(current) - symmetric_similarity(current, fixed, moving, similarity, steps)
            loss.sum().backward()  # pairs are independent: each one's gradient is its own
            optimiser.step()
        with torch.no_grad():
            current = refined_velocity()
            before = symmetric_similarity(start, fixed, moving, similarity, steps)
            after = symmetric_similarity(current, fixed, moving, similarity, steps)
            converged = torch.isfinite(after) & torch.isfinite(current).flatten(1).all(1) & (after > before)
            refined = torch.where(converged.view(-1, 1, 1, 1, 1), current, start)
    reports = [
        {"steps": iterations, "similarity": similarity, "before": b, "after": a, "converged": c}
        for b, a, c in zip(before.tolist(), after.tolist(), converged.tolist())
    ]
    return refined.detach(), reports
