"""Affine pre-alignment of a pair on the canvas (request parameter ``align``): what runs before the network.

The network has only seen pairs already affinely aligned (LUMIR's); a scan in
scanner pose arrives rotated and shifted. This stage estimates, per pair, the
pull-back matrix ``M`` (canvas voxels, homogeneous ``(4, 4)``) with
``moving(M x)`` matching ``fixed(x)``:

1. centre of intensity mass: the fixed image's centre maps onto the moving
   one's; then the principal axes of the two images' second moments give a
   rotation, kept when it matches better than none at the coarsest level
   (the axes' signs chosen for the rotation closest to the identity);
2. Adam over the parameters at 1/8 then 1/4 resolution (means over 8^3 and
   4^3 voxels), maximising the local NCC (window :data:`NCC_WINDOWS`) or, across
   contrasts, the mutual information of the fixed image and the moving one
   warped through the displacement ``M x - x``: every op is a
   :mod:`lumireg.kernels` op with its autograd (Triton on a GPU, the twins on a CPU).

Parameters: a rotation vector (radians, ``matrix_exp`` of its skew matrix) and
a shift (voxels) about the fixed image's centre of mass (``rigid``: 6), times
``I + E`` for ``affine`` (9 more: scales and shears). A pair whose similarity
ends worse than at the centre-of-mass start (by more than :data:`TOLERANCE`), or whose result is not
finite, implausible (a scale beyond :data:`SCALE_LIMITS`) or leaves the images
barely overlapping, falls back to the centre-of-mass alignment and is reported
as not converged.

Conventions: images ``(B, 1, D, H, W)`` 0..255; displacements ``(B, 3, D, H, W)``
float32 in voxels, pull-back from the fixed grid, channel c along array axis c.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lumireg.contract import CANVAS_SPACING_MM
from lumireg.kernels import local_ncc, mutual_information, warp
from lumireg.network.cascade import halve, resample_like

MODES = ("none", "rigid", "affine")
SIMILARITIES = ("ncc", "mi")
# resolution factors, coarse to fine: 1/8 and 1/4, not 1/4 and 1/2, for a CPU (README: about 2 s at B=1 on 2 cores,
# corners within 1 mm); a 1/2 level costs 8x a 1/4 step there for no measured gain in accuracy
LEVELS = (8, 4)
ITERATIONS = (50, 15)  # Adam steps per level
NCC_WINDOWS = (3, 5)  # local NCC window per level, level voxels (24 mm, 20 mm)
TOLERANCE = 0.01  # similarity lost against the centre-of-mass start (NCC 0..1, MI nats) still called converged
MI_BINS = 32
LEARNING_RATES = {"rotation": 0.02, "shift": 1.0, "linear": 0.005}  # radians, level-0 voxels (scaled), unitless
SCALE_LIMITS = (0.6, 1.6)  # singular values of the linear part outside these: implausible, fall back
MIN_OVERLAP = 0.5  # Dice of the two images' supports after alignment below this: fall back
# a pair whose estimate moves no corner of the fixed brain's bounding box by this much (voxels) is already aligned
# as LUMIR's pairs are (the network corrects a few mm itself): kept as it is, since resampling would only blur it
# (applying such small estimates cost the network 0.003 Dice on pre-aligned pairs)
PRE_ALIGNED_VOXELS = 5.0
_EPS = 1e-8


def _coordinates(shape, factor: int, device) -> list[torch.Tensor]:
    """Full-resolution voxel coordinates of the centres of a level's voxels, one 1-D tensor per axis."""
    return [torch.arange(n, device=device, dtype=torch.float32) * factor + (factor - 1) / 2 for n in shape]


def affine_displacement(matrix: torch.Tensor, shape, factor: int = 1) -> torch.Tensor:
    """The displacement ``M x - x`` of pull-back matrices on a grid.

    Args:
        matrix: ``(B, 4, 4)`` (or ``(B, 3, 4)``) float, full-resolution voxels: fixed voxel x -> moving voxel ``M x``.
        shape: the grid ``(D, H, W)`` at resolution ``1 / factor``.
        factor: the grid's voxel is ``factor`` full-resolution voxels (2 x 2 x 2 means: centres at
            ``factor * i + (factor - 1) / 2``).

    Returns:
        ``(B, 3, D, H, W)`` float32 displacement in the grid's voxels, pull-back, differentiable in ``matrix``.
    """
    d, h, w = _coordinates(shape, factor, matrix.device)
    linear = matrix[:, :3, :3].float() - torch.eye(3, device=matrix.device)
    offset = matrix[:, :3, 3].float()
    field = (
        linear[:, :, 0, None, None, None] * d[:, None, None]
        + linear[:, :, 1, None, None, None] * h[None, :, None]
        + linear[:, :, 2, None, None, None] * w[None, None, :]
        + offset[:, :, None, None, None]
    )
    return field / factor


def inverse_affine_displacement(matrix: torch.Tensor, shape) -> torch.Tensor:
    """The displacement of ``inv(M)`` on the full-resolution grid ``shape``: pulls the fixed image onto the moving
    grid. ``matrix``: ``(B, 4, 4)``; returns ``(B, 3, D, H, W)`` float32 voxels."""
    return affine_displacement(torch.linalg.inv(matrix.double()).float(), shape)


def _skew(r: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(r[:, 0])
    x, y, z = r.unbind(1)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], 1).view(-1, 3, 3)


def _rotation(r: torch.Tensor) -> torch.Tensor:
    """``exp([r])``, ``(B, 3, 3)``, by Rodrigues' formula ``I + sin(t)/t K + (1 - cos(t))/t^2 K^2`` (``t = |r|``,
    ``K = [r]``): a handful of ops where ``torch.linalg.matrix_exp`` takes hundreds on a CPU. Near ``t = 0`` the
    two factors are their Taylor series (exact to float32 there), so the gradient stays finite at the start."""
    k = _skew(r)
    t2 = (r * r).sum(1)[:, None, None]
    small = t2 < 1e-4
    t = t2.clamp_min(1e-4).sqrt()
    first = torch.where(small, 1 - t2 / 6, torch.sin(t) / t)
    second = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / t2.clamp_min(1e-4))
    return torch.eye(3, device=r.device) + first * k + second * (k @ k)


def _matrix(rotation, shift, linear, base, centre, target) -> torch.Tensor:
    """``(B, 4, 4)``: ``y = exp([r]) base (I + E) (x - centre) + target + shift``."""
    a = _rotation(rotation) @ base
    if linear is not None:
        a = a @ (torch.eye(3, device=a.device) + linear)
    top = torch.cat([a, (target + shift - (a @ centre[..., None])[..., 0])[..., None]], 2)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=a.device).expand(a.shape[0], 1, 4)
    return torch.cat([top, bottom], 1)


def _moments(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mass ``(B,)``, centre of intensity mass ``(B, 3)`` and second central moments ``(B, 3, 3)``, voxels."""
    b = image.shape[0]
    weights = image.float().reshape(b, *image.shape[2:])
    mass = weights.flatten(1).sum(1)
    axes = _coordinates(image.shape[2:], 1, image.device)
    grids = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
    centre = torch.stack([(weights * g).flatten(1).sum(1) for g in grids], 1) / (mass[:, None] + _EPS)
    second = torch.empty(b, 3, 3, device=image.device)
    for i in range(3):
        for j in range(i, 3):
            di = grids[i] - centre[:, i, None, None, None]
            dj = grids[j] - centre[:, j, None, None, None]
            second[:, i, j] = second[:, j, i] = (weights * di * dj).flatten(1).sum(1) / (mass + _EPS)
    return mass, centre, second


def _moment_rotation(fixed_second: torch.Tensor, moving_second: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` rotation taking the fixed image's principal axes onto the moving one's, the axes' signs
    chosen for the smallest rotation angle."""
    _, vf = torch.linalg.eigh(fixed_second.double())
    _, vm = torch.linalg.eigh(moving_second.double())
    best, best_trace = None, None
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
        r = vm @ torch.diag(torch.tensor(signs, dtype=torch.float64, device=vm.device)) @ vf.transpose(1, 2)
        r = r * torch.linalg.det(r)[:, None, None]  # a proper rotation whatever eigh's handedness
        trace = r.diagonal(dim1=1, dim2=2).sum(1)
        if best is None:
            best, best_trace = r, trace
        else:
            better = trace > best_trace
            best = torch.where(better[:, None, None], r, best)
            best_trace = torch.maximum(trace, best_trace)
    return best.float()


def _levels(fixed: torch.Tensor, moving: torch.Tensor, levels) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{factor: (fixed, moving)}``: both images 0..1 as means over ``factor``^3 blocks, each coarser level pooled
    from the finer one (each factor divides the coarser ones), so the full resolution is read once."""
    out, images, previous = {}, (fixed.float() / 255, moving.float() / 255), 1
    for factor in sorted(levels):
        images = tuple(F.avg_pool3d(image, factor // previous) for image in images)
        out[factor], previous = images, factor
    return out


def _similarity(name: str, fixed: torch.Tensor, moving: torch.Tensor, window: int) -> torch.Tensor:
    if name == "ncc":
        return local_ncc(fixed, moving, window)
    return mutual_information(fixed, moving, MI_BINS)


def _score(matrix, fixed_level, moving_level, factor, similarity, window) -> torch.Tensor:
    moved = warp(moving_level, affine_displacement(matrix, fixed_level.shape[2:], factor))
    return _similarity(similarity, fixed_level, moved, window)


def _decompose(matrix: torch.Tensor, shape) -> dict:
    """The report's geometry of one ``(4, 4)`` float64 voxel matrix on a grid ``shape``."""
    spacing = CANVAS_SPACING_MM
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    # millimetres about the canvas centre: x_mm = spacing * (x - centre)
    to_mm = torch.eye(4, dtype=torch.float64)
    to_mm[:3, :3] *= spacing
    to_mm[:3, 3] = -spacing * centre
    matrix_mm = to_mm @ matrix @ torch.linalg.inv(to_mm)
    u, _, vt = torch.linalg.svd(matrix[:3, :3])
    rotation = u @ vt
    cosine = ((rotation.trace() - 1) / 2).clamp(-1, 1)
    return {
        "matrix_voxels": matrix.tolist(),
        "matrix_mm": matrix_mm.tolist(),
        "angle_degrees": math.degrees(math.acos(float(cosine))),
        "shift_mm": matrix_mm[:3, 3].tolist(),
    }


def _corner_shift(matrix: torch.Tensor, fixed: torch.Tensor, factor: int) -> torch.Tensor:
    """Largest distance (full-resolution voxels) that ``matrix`` moves a corner of the bounding box of ``fixed``'s
    support (at a level of ``factor``), per pair; the whole image's corners when it is empty."""
    out = []
    for m, image in zip(matrix, fixed):
        inside = (image[0] > 0.02).nonzero().float()
        if not len(inside):
            inside = torch.tensor([[0.0, 0.0, 0.0], [n - 1.0 for n in image.shape[1:]]], device=image.device)
        low, high = inside.min(0).values * factor, inside.max(0).values * factor + factor - 1
        corners = torch.stack(torch.meshgrid(*[torch.stack([lo, hi]) for lo, hi in zip(low, high)], indexing="ij"))
        corners = torch.cat([corners.reshape(3, -1), torch.ones(1, 8, device=image.device)])
        out.append((m @ corners - corners)[:3].norm(dim=0).max())
    return torch.stack(out)


def _overlap(fixed: torch.Tensor, moving: torch.Tensor, matrix: torch.Tensor, factor: int) -> torch.Tensor:
    """Dice of the supports (> 0) of ``fixed`` and ``moving`` moved by ``matrix``, per pair, at a level."""
    moved = warp(moving, affine_displacement(matrix, fixed.shape[2:], factor))
    a, b = (fixed > 0.02).flatten(1).float(), (moved > 0.02).flatten(1).float()
    return 2 * (a * b).sum(1) / (a.sum(1) + b.sum(1) + _EPS)


def estimate(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mode: str = "affine",
    similarity: str = "ncc",
    *,
    iterations: tuple[int, ...] = ITERATIONS,
    levels: tuple[int, ...] = LEVELS,
    windows: tuple[int, ...] = NCC_WINDOWS,
) -> tuple[torch.Tensor, list[dict]]:
    """Estimate the affine (or rigid) pull-back matrix of each pair.

    Args:
        fixed, moving: ``(B, 1, D, H, W)`` 0..255 (uint8 as served, or float), one device;
            D, H, W divisible by the coarsest level's factor (8).
        mode: ``"rigid"`` (rotation and shift: 6 parameters) or ``"affine"`` (12).
        similarity: ``"ncc"`` (local NCC, same contrast) or ``"mi"`` (mutual information, across contrasts).
        iterations: Adam steps per level of :data:`LEVELS`.

    Returns:
        ``(matrix, reports)``: ``(B, 4, 4)`` float32 pull-back matrices in voxels (fixed voxel x -> moving voxel
        ``M x``; :func:`affine_displacement` makes the field) and one dict per pair: ``mode``, ``converged``,
        ``similarity``, ``before`` / ``after`` (the similarity at the finest level at the centre-of-mass start and
        for the matrix returned), ``matrix_voxels``, ``matrix_mm`` (about the canvas centre, mm),
        ``angle_degrees`` (the rotation of its polar part), ``shift_mm`` (where the canvas centre moves),
        ``overlap`` (Dice of the two supports after alignment), ``moving_volume_ml`` (the moving image's
        volume above 5 % of full intensity, ml), ``pre_aligned`` (the estimate moved no corner of the fixed brain's
        box by :data:`PRE_ALIGNED_VOXELS`: the identity is returned), and ``reason`` when not converged.
    """
    if mode not in ("rigid", "affine"):
        raise ValueError(f"mode must be 'rigid' or 'affine', got {mode!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if any(n % levels[0] for n in fixed.shape[2:]) or fixed.shape != moving.shape:
        raise ValueError(
            f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)}: one shape divisible by {levels[0]}"
        )
    shape = tuple(fixed.shape[2:])
    device, b = fixed.device, fixed.shape[0]
    # a caller's inference_mode or no_grad must not stop the optimisation: fresh tensors, grad on
    with torch.inference_mode(False), torch.enable_grad():
        fixed, moving = fixed.clone(), moving.clone()
        coarse = _levels(fixed, moving, levels)
        f4, m4 = coarse[levels[0]]
        with torch.no_grad():
            mass_f, centre_f, second_f = _moments(f4)
            mass_m, centre_m, second_m = _moments(m4)
            centre_f, centre_m = centre_f * levels[0] + (levels[0] - 1) / 2, centre_m * levels[0] + (levels[0] - 1) / 2
            second_f, second_m = second_f * levels[0] ** 2, second_m * levels[0] ** 2
            empty = (mass_f <= 0) | (mass_m <= 0)
            image_centre = (torch.tensor(shape, dtype=torch.float32, device=device) - 1) / 2
            centre_f = torch.where(empty[:, None], image_centre, centre_f)
            centre_m = torch.where(empty[:, None], image_centre, centre_m)
            identity = torch.eye(3, device=device).expand(b, 3, 3)
            zeros = torch.zeros(b, 3, device=device)
            start = _matrix(zeros, zeros, None, identity, centre_f, centre_m)  # centre of mass alone
            rotated = _moment_rotation(second_f, second_m)
            rotated = torch.where(
                (empty | ~torch.isfinite(rotated).flatten(1).all(1))[:, None, None], identity, rotated
            )
            with_moments = _matrix(zeros, zeros, None, rotated, centre_f, centre_m)
            window = windows[0]
            better = _score(with_moments, f4, m4, levels[0], similarity, window) > _score(
                start, f4, m4, levels[0], similarity, window
            )
            base = torch.where(better[:, None, None], rotated, identity)
        parameters = {"rotation": zeros.clone(), "shift": zeros.clone()}
        if mode == "affine":
            parameters["linear"] = torch.zeros(b, 3, 3, device=device)
        for tensor in parameters.values():
            tensor.requires_grad_(True)
        for factor, steps, window in zip(levels, iterations, windows):
            fixed_level, moving_level = coarse[factor]
            # finer levels polish: every step size scales with the voxel
            rates = {name: rate * factor / levels[0] for name, rate in LEARNING_RATES.items()}
            optimiser = torch.optim.Adam([{"params": [p], "lr": rates[name]} for name, p in parameters.items()])
            for _ in range(steps):
                optimiser.zero_grad(set_to_none=True)
                matrix = _matrix(
                    parameters["rotation"], parameters["shift"], parameters.get("linear"), base, centre_f, centre_m
                )
                loss = -_score(matrix, fixed_level, moving_level, factor, similarity, window)
                loss.sum().backward()  # pairs are independent: each one's gradient is its own
                optimiser.step()
        with torch.no_grad():
            matrix = _matrix(
                parameters["rotation"], parameters["shift"], parameters.get("linear"), base, centre_f, centre_m
            )
            factor, window = levels[-1], windows[-1]
            fixed_level, moving_level = coarse[factor]
            before = _score(start, fixed_level, moving_level, factor, similarity, window)
            after = _score(matrix, fixed_level, moving_level, factor, similarity, window)
            finite = torch.isfinite(matrix).flatten(1).all(1) & torch.isfinite(after)
            safe = torch.where(finite[:, None, None], matrix, start)
            scales = torch.linalg.svdvals(safe[:, :3, :3])
            plausible = (scales.min(1).values >= SCALE_LIMITS[0]) & (scales.max(1).values <= SCALE_LIMITS[1])
            overlap = _overlap(fixed_level, moving_level, safe, factor)
            improved = after >= before - TOLERANCE
            overlapping, found_overlap = overlap >= MIN_OVERLAP, overlap
            converged = ~empty & finite & plausible & improved & overlapping
            # a start already as good (a pre-aligned pair) is kept
            keep = converged & (after >= before)
            moved = _corner_shift(safe, fixed_level, factor)
            pre_aligned = converged & (moved < PRE_ALIGNED_VOXELS)
            identity4 = torch.eye(4, device=device).expand(b, 4, 4)
            matrix = torch.where(keep[:, None, None], safe, start)
            matrix = torch.where(pre_aligned[:, None, None], identity4, matrix)
            overlap = torch.where(keep, overlap, _overlap(fixed_level, moving_level, start, factor))
        # the moving image's nonzero volume (above 5 % of full intensity), for the QC's skull-stripping check
        volume = (moving > 0.05 * 255).flatten(1).sum(1) * CANVAS_SPACING_MM**3 / 1000
    reports = []
    for index in range(b):
        reason = None
        if bool(empty[index]):
            reason = "an image is empty (no intensity mass)"
        elif not bool(finite[index]):
            reason = "the optimisation diverged (not finite)"
        elif not bool(plausible[index]):
            reason = f"the estimated scales {scales[index].tolist()} are implausible"
        elif not bool(improved[index]):
            reason = "the similarity ended worse than at the centre-of-mass start"
        elif not bool(overlapping[index]):
            reason = f"the images barely overlap (Dice of their supports {float(found_overlap[index]):.2f})"
        report = {
            "mode": mode,
            "converged": reason is None,
            "similarity": similarity,
            "before": float(before[index]),
            "after": float(after[index]) if bool(keep[index]) else float(before[index]),
            "overlap": float(overlap[index]),
            "moving_volume_ml": float(volume[index]),
            "pre_aligned": bool(pre_aligned[index]),
            **_decompose(matrix[index].double().cpu(), shape),
        }
        if reason:
            report["reason"] = reason
        reports.append(report)
    return matrix.detach(), reports


def resample(moving: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``moving`` pulled through ``matrix`` (``(B, 4, 4)`` voxels) onto the fixed grid, trilinear, zero outside,
    in ``moving``'s dtype (integers rounded and clipped to their range)."""
    return resample_like(moving, affine_displacement(matrix, moving.shape[2:]))


def resample_half(moving: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``moving`` (``(B, 1, D, H, W)``, D, H, W even) averaged over 2 x 2 x 2 blocks, then pulled through ``matrix``
    onto the half-resolution grid: ``(B, 1, D/2, H/2, W/2)`` in ``moving``'s dtype.

    What a coarse pass (:func:`lumireg.network.cascade.coarse_pass`) sees of the aligned image, for an eighth of
    :func:`resample`'s cost (the halved :func:`resample` would average eight full-resolution samples per voxel;
    this takes one trilinear sample of the averages). The identity gives the halved image exactly.
    """
    half = [n // 2 for n in moving.shape[2:]]
    return resample_like(halve(moving), affine_displacement(matrix, half, factor=2))


def compose_with(matrix: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """The displacement of ``x -> M (x + u(x))``: the network's ``u`` (found on the aligned pair) then the affine,
    exactly: ``(M x - x) + A u(x)``. ``matrix`` ``(B, 4, 4)``, ``displacement`` ``(B, 3, D, H, W)`` voxels."""
    linear = matrix[:, :3, :3].to(displacement.dtype)
    shift = affine_displacement(matrix, displacement.shape[2:]).to(displacement.dtype)
    return shift + torch.einsum("bij,bj...->bi...", linear, displacement)


def compose_inverse(matrix: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`compose_with`'s transform: ``inv(M)`` first, then the network's inverse ``inverse``
    (``(B, 3, D, H, W)`` voxels, sampled trilinearly with border padding); pulls the fixed image onto the moving
    grid. ``matrix``: ``(B, 4, 4)`` voxels."""
    inner = inverse_affine_displacement(matrix, inverse.shape[2:]).to(inverse.dtype)
    return inner + warp(inverse, inner, padding="border")
