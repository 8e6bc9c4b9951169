"""The QC report of a registration: folding, similarity before and after, and the warnings they raise.

Folding is LUMIR's (NDV and the central-difference Jacobian's minimum: the
evaluator's numbers, computed by the screened twins of
:mod:`lumireg.evaluate.metrics`). Similarity before and after: the local NCC
of :func:`lumireg.kernels.local_ncc` at half resolution (2 x 2 x 2 means,
where it costs an eighth), and the mutual information of
:func:`lumireg.kernels.mutual_information` over the fixed image's brain at full
resolution (a joint histogram of the 8-bit levels, one ``bincount``), which
decides ``similarity_decreased``. On a 2-core CPU a report costs a small
fraction of the registration it checks (README, "Benchmarks").

Conventions: images ``(B, 1, D, H, W)`` 0..255; displacements ``(B, 3, D, H, W)``
in voxels, pull-back from the fixed grid (``README``, "Conventions").
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from lumireg import __version__, contract
from lumireg.contract import HALF_NCC_WINDOW, MI_DROP_PERCENT, NDV_WARNING_PERCENT, QC_WARNINGS
from lumireg.evaluate.metrics import screened_jacobian_min, screened_ndv_percent

NCC_EPS = 1e-5  # lumireg.kernels.local_ncc's guard of flat windows
MI_BINS, MI_SIGMA = 32, 0.5  # lumireg.kernels.mutual_information's defaults: bins over 0..1, Gaussian width in bins
MI_EPS = 1e-10  # its guard of empty bins
# similarity_decreased when the brain's mutual information falls by more than this share. Measured with the
# bundled network: an image registered to itself moves it by under 0.1 %, same-contrast pairs it registers gain
# 140-210 %, T1/T2-like pairs it makes worse lose 32-45 % (aligned before) or 7-25 % (8 of 10 misaligned ones)
MI_DROP = MI_DROP_PERCENT / 100


def quality_report(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    warped: torch.Tensor,
    displacement: torch.Tensor,
    model: str,
    passes: int = 1,
    *,
    coarse: int = 0,
    refinement: list[dict] | None = None,
) -> list[dict]:
    """One QC dict per pair.

    Keys: ``ndv_percent`` (non-diffeomorphic volume in % of the moving image's
    nonzero voxels, LUMIR's definition: :func:`lumireg.evaluate.metrics.ndv_percent`; None for an all-zero
    moving image)
    and ``jacobian_min`` (smallest central-difference Jacobian determinant over
    the volume, <= 0 where it folds: :func:`lumireg.evaluate.metrics.jacobian_determinant`),
    the evaluator's numbers computed by their screened twins; ``ncc_before`` /
    ``ncc_after`` (mean local NCC of fixed vs moving and fixed vs warped,
    :func:`lumireg.kernels.local_ncc` with window :data:`~lumireg.contract.HALF_NCC_WINDOW` on the
    half-resolution images, 2 x 2 x 2 means of the 0..1 intensities; 1 =
    identical up to local affine intensity changes); ``mi_before`` /
    ``mi_after`` (mutual information in nats,
    :func:`lumireg.kernels.mutual_information`'s Parzen estimate with
    :data:`MI_BINS` bins and width :data:`MI_SIGMA` of the 0..1 intensities, at
    full resolution over the voxels where the fixed image is nonzero, the
    brain; the warped image taken at its nearest 8-bit level); ``passes``
    (full-resolution network passes composed) and ``coarse`` (half-resolution
    passes before them); ``refinement`` (the refinement's own record for
    the pair, as given, or None); ``warnings`` (``{"code", "message"}`` from
    :data:`lumireg.contract.QC_WARNINGS`: ``similarity_decreased`` when the
    brain MI fell by more than :data:`MI_DROP` of its value before,
    ``folding`` when ``ndv_percent`` exceeds
    :data:`~lumireg.contract.NDV_WARNING_PERCENT`, ``refinement_not_converged``
    when the refinement says it did not converge, ``empty_image`` when either image is of one value (all zero
    or constant: nothing to register)); ``model`` and ``version``
    (lumireg's). MI decides ``similarity_decreased``: it measures how well one
    image predicts the other whatever their contrasts, while the local NCC, a
    squared local correlation, rises wherever edges line up, even between
    unlike tissues (it rose on T1/T2 pairs the network made worse).

    Args:
        fixed, moving, warped: ``(B, 1, D, H, W)`` on one device, any real dtype (0..255).
        displacement: ``(B, 3, D, H, W)`` voxels.
        model: the name of the weights, reported as is.
        passes, coarse: the full-resolution and the coarse network passes that made ``displacement``, as is.
        refinement: one dict per pair from the instance optimisation (``steps``, ``similarity``
            ``"ncc"`` | ``"mi"``, ``before``, ``after``, ``converged``), or None when it did not run.
    """
    if refinement is not None and len(refinement) != len(fixed):
        raise ValueError(f"refinement has {len(refinement)} records for {len(fixed)} pairs")
    fields = [field.permute(1, 2, 3, 0) for field in displacement]  # the metrics take [D, H, W, 3]
    with _parallel_parts(displacement.device.type == "cpu") as pool:
        ndvs = [pool.submit(screened_ndv_percent, field, mask) for field, mask in zip(fields, moving[:, 0])]
        minima = [pool.submit(screened_jacobian_min, field) for field in fields]
        similarities = [similarity(*images) for images in zip(fixed, moving, warped)]
        ndvs, minima = [f.result() for f in ndvs], [f.result() for f in minima]
    reports = []
    blank = [bool(f.min() == f.max() or m.min() == m.max()) for f, m in zip(fixed, moving)]
    for i, (ndv, jacobian_min, measures) in enumerate(zip(ndvs, minima, similarities)):
        record = None if refinement is None else dict(refinement[i])
        ndv = ndv if math.isfinite(ndv) else None  # no moving voxel to count over: undefined, not NaN
        report = {"ndv_percent": ndv, "jacobian_min": jacobian_min, **measures, "passes": passes, "coarse": coarse}
        report["refinement"] = record
        found = warnings(report)
        if blank[i]:  # the similarities of an image of one value say nothing
            found = [_warning("empty_image")] + [w for w in found if w["code"] != "similarity_decreased"]
        reports.append(report | {"warnings": found, "model": model, "version": __version__})
    return reports


@contextmanager
def _parallel_parts(cpu: bool):
    """Two worker threads beside the caller's; on a CPU, torch's intra-op threads set to 1 until they finish.

    On a CPU the report is thousands of operations on cache-sized slabs; split
    across the cores one by one they wait on each other (on 2 shared cores the
    report took 1.4x as long), so the parts run side by side instead. torch's
    thread count is process-wide: it is set back on exit.
    """
    threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            yield pool
    finally:
        if cpu:
            torch.set_num_threads(threads)


def warnings(report: dict) -> list[dict]:
    """The :data:`lumireg.contract.QC_WARNINGS` that apply to one report, as ``{"code", "message"}``."""
    codes = []
    if report["mi_after"] < (1 - MI_DROP) * report["mi_before"]:
        codes.append("similarity_decreased")
    if report["ndv_percent"] is not None and report["ndv_percent"] > NDV_WARNING_PERCENT:
        codes.append("folding")
    if report.get("refinement") is not None and not report["refinement"]["converged"]:
        codes.append("refinement_not_converged")
    return [_warning(code) for code in codes]


def _warning(code: str) -> dict:
    return {"code": code, "message": QC_WARNINGS[code]}


def similarity(fixed: torch.Tensor, moving: torch.Tensor, warped: torch.Tensor) -> dict:
    """``ncc_before``, ``ncc_after``, ``mi_before``, ``mi_after`` of one pair (see :func:`quality_report`).

    Args:
        fixed, moving, warped: ``(1, D, H, W)``, 0..255, any real dtype.
    """
    ncc = local_ncc_sums(*[half_sums(image[0]).div_(8 * 255) for image in (fixed, moving, warped)], HALF_NCC_WINDOW)
    mi = brain_mutual_information(fixed[0], moving[0], warped[0])
    return {"ncc_before": ncc[0], "ncc_after": ncc[1], "mi_before": mi[0], "mi_after": mi[1]}


def half_sums(image: torch.Tensor, planes: int = 8) -> torch.Tensor:
    """``(D, H, W)`` -> ``(D // 2, H // 2, W // 2)`` float32 sums of 2 x 2 x 2 blocks (a last odd slice dropped).

    ``planes`` output planes at a time, through one small buffer: a fresh full-size temporary costs more to
    map (page faults) than to compute on a CPU.
    """
    d, h, w = (n // 2 for n in image.shape)
    out = torch.empty(d, h, w, dtype=torch.float32, device=image.device)
    pairs = torch.empty(planes, 2 * h, 2 * w, dtype=torch.float32, device=image.device)
    quads = torch.empty(planes, h, 2 * w, dtype=torch.float32, device=image.device)
    for i in range(0, d, planes):
        j = min(i + planes, d)
        rows = pairs[: j - i].copy_(image[2 * i : 2 * j : 2, : 2 * h, : 2 * w])
        rows += image[2 * i + 1 : 2 * j : 2, : 2 * h, : 2 * w]
        torch.add(rows[:, 0::2], rows[:, 1::2], out=quads[: j - i])
        torch.add(quads[: j - i, :, 0::2], quads[: j - i, :, 1::2], out=out[i:j])
    return out


def local_ncc_sums(
    fixed: torch.Tensor, moving: torch.Tensor, warped: torch.Tensor, window: int, planes: int = 8
) -> list[float]:
    """:func:`lumireg.kernels.local_ncc` of ``fixed`` vs ``moving`` and ``fixed`` vs ``warped`` (``(D, H, W)``
    float32 each): the same definition (zero padding, ``cc = cross**2 / (var_f var_m + 1e-5)`` averaged over
    every voxel), computed ``planes`` planes at a time.

    The eight box-summed fields (three images, their squares, the two cross
    products) of a slab and its ``window // 2`` neighbouring planes sit in one
    zero-padded buffer, summed along each axis by shifted flat slices (a
    neighbour is a fixed offset; only padding positions, which are dropped, mix
    rows): on a CPU a fraction of the kernels' twin, which pools the whole
    volume with ``avg_pool3d``.
    """
    radius, n = window // 2, window**3
    depth, height, width = fixed.shape
    padded = (planes + 2 * radius, height + 2 * radius, width + 2 * radius)
    plane = padded[1] * padded[2]
    size = padded[0] * plane
    fields = fixed.new_zeros(8, *padded)  # its padding stays zero; a slab's planes are written in
    pairs, shifted, summed = fixed.new_empty(8, size), fixed.new_empty(8, size), fixed.new_empty(8, size)
    inner = (slice(radius, radius + height), slice(radius, radius + width))
    totals = [0.0, 0.0]
    for d0 in range(0, depth, planes):
        d1 = min(d0 + planes, depth)
        lo, hi = max(0, d0 - radius), min(depth, d1 + radius)  # the planes the slab's windows reach
        at = (slice(lo - d0 + radius, hi - d0 + radius), *inner)
        fields[:, : at[0].start].zero_()
        fields[:, at[0].stop :].zero_()
        f, m, w = (fields[i][at] for i in range(3))
        f.copy_(fixed[lo:hi])
        m.copy_(moving[lo:hi])
        w.copy_(warped[lo:hi])
        for i, (x, y) in enumerate(((f, f), (m, m), (w, w), (f, m), (f, w))):
            torch.mul(x, y, out=fields[3 + i][at])
        source = fields.view(8, size)
        for stride, target in ((1, shifted), (padded[2], summed), (plane, shifted)):
            # window sums x[p - r] + ... + x[p + r] as pair sums (x[q] + x[q + 1]) at q = p - r, p - r + 2, ...,
            # then x[p + r]: r + 1 additions instead of 2 r
            reach, length = radius * stride, size - 2 * radius * stride
            torch.add(source[:, : size - stride], source[:, stride:], out=pairs[:, : size - stride])
            out = torch.add(
                pairs[:, :length], source[:, 2 * reach : 2 * reach + length], out=target[:, reach : reach + length]
            )
            for j in range(1, radius):
                out += pairs[:, 2 * j * stride : 2 * j * stride + length]
            source = target
        sums = shifted.view(8, *padded)[:, radius : radius + d1 - d0, inner[0], inner[1]]
        s_f, s_m, s_w, s_ff, s_mm, s_ww, s_fm, s_fw = sums
        var_f = s_ff - s_f * s_f / n
        for i, (s_x, s_xx, s_fx) in enumerate(((s_m, s_mm, s_fm), (s_w, s_ww, s_fw))):
            cross = s_fx - s_f * s_x / n
            var_x = s_xx - s_x * s_x / n
            totals[i] += float((cross * cross / (var_f * var_x + NCC_EPS)).sum(dtype=torch.float64))
    return [total / fixed.numel() for total in totals]


def _level(part: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Integer levels as they are; real values at their nearest level 0..255 (halves to even), in ``buffer``."""
    if not part.dtype.is_floating_point:
        return part
    return torch.clamp(part, 0, 255, out=buffer).round_()


def bounding_box(image: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """The slices of the smallest box holding every nonzero voxel of a ``(D, H, W)`` image; None if it is all zero."""
    nonzero = image if image.dtype == torch.uint8 else (image != 0).to(torch.uint8)
    planes, rows = nonzero.amax(dim=2), nonzero.amax(dim=1)  # (D, H), (D, W): uint8 reductions are fast
    box = []
    for present in (planes.amax(dim=1), planes.amax(dim=0), rows.amax(dim=0)):
        index = torch.nonzero(present).flatten()
        if not len(index):
            return None
        box.append(slice(int(index[0]), int(index[-1]) + 1))
    return tuple(box)


def parzen_weights(bins: int = MI_BINS, sigma: float = MI_SIGMA, device=None) -> torch.Tensor:
    """``(256, bins)`` float64: :func:`lumireg.kernels.mutual_information`'s weights of each 8-bit level ``/ 255``
    (Gaussian of width ``sigma`` bin spacings around the centres ``k / (bins - 1)``, normalised per level)."""
    levels = torch.arange(256, dtype=torch.float64, device=device) / 255
    centres = torch.linspace(0.0, 1.0, bins, dtype=torch.float64, device=device)
    return torch.softmax(-((levels[:, None] - centres) ** 2) / (2 * (sigma / (bins - 1)) ** 2), dim=1)


def brain_mutual_information(fixed: torch.Tensor, *others: torch.Tensor, planes: int = 8) -> list[float]:
    """Mutual information in nats of ``fixed`` with each of ``others`` over the voxels where ``fixed`` > 0.

    Args:
        fixed, others: ``(D, H, W)`` 0..255 on one grid, any real dtype; a voxel is taken at its nearest level
            (halves to even, as ``numpy.rint``).
        planes: planes per slab (the index buffers stay small).

    Returns:
        One float per other image: :func:`lumireg.kernels.mutual_information` of the levels ``/ 255`` at those
        voxels. A voxel's Parzen weights depend on its level alone, so the joint histogram is ``W^T H W``
        with ``H`` the 256 x 256 counts of level pairs: a ``bincount`` instead of ``(voxels, bins)`` weights.
    """
    box = bounding_box(fixed)  # the voxels outside it are background, left out anyway
    if box is None:
        return [0.0 for _ in others]
    fixed, others = fixed[box], [other[box] for other in others]
    depth, height, width = fixed.shape
    counts = [torch.zeros(256 * 256, dtype=torch.int64, device=fixed.device) for _ in others]
    rows = torch.empty(planes, height, width, dtype=torch.int32, device=fixed.device)
    index, levels = torch.empty_like(rows), torch.empty(rows.shape, dtype=torch.float32, device=fixed.device)
    for d0 in range(0, depth, planes):
        k = min(planes, depth - d0)
        row = rows[:k].copy_(_level(fixed[d0 : d0 + k], levels[:k])).mul_(256)  # the fixed level picks the row
        for count, other in zip(counts, others):
            torch.add(index[:k].copy_(_level(other[d0 : d0 + k], levels[:k])), row, out=index[:k])
            count += torch.bincount(index[:k].flatten(), minlength=256 * 256)
    weights = parzen_weights(device=fixed.device)
    out = []
    for count in counts:
        pairs = count.view(256, 256)[1:].to(torch.float64)  # fixed level 0, the background, left out
        total = pairs.sum()
        if not total:
            out.append(0.0)
            continue
        joint = weights[1:].T @ (pairs / total) @ weights
        p_fixed, p_other = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
        out.append(float((joint * torch.log((joint + MI_EPS) / (p_fixed * p_other + MI_EPS))).sum()))
    return out


def with_alignment(report: dict, alignment: dict) -> dict:
    """``report`` with the affine pre-alignment's record (:func:`lumireg.network.align.estimate`) and its warnings.

    Adds ``alignment``: ``mode``, ``converged``, ``matrix_voxels`` (canvas voxels, pull-back: fixed voxel x ->
    moving voxel ``M x``), ``matrix_mm`` (the same in mm about the canvas centre), ``angle_degrees``, ``shift_mm``,
    ``moving_volume_ml`` and the rest of the record; and to ``warnings`` ``alignment_not_converged`` (the
    centre-of-mass alignment was used) and ``not_brain_extracted`` (the moving image's volume above 5 % of full
    intensity exceeds :data:`lumireg.contract.BRAIN_VOLUME_LIMIT_ML`).
    """
    codes = [] if alignment["converged"] else ["alignment_not_converged"]
    if alignment["moving_volume_ml"] > contract.BRAIN_VOLUME_LIMIT_ML:
        codes.append("not_brain_extracted")
    warned = report.get("warnings", []) + [{"code": code, "message": contract.QC_WARNINGS[code]} for code in codes]
    return {**report, "alignment": dict(alignment), "warnings": warned}
