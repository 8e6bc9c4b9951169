"""The QC report of a registration: folding (LUMIR's NDV, the Jacobian's minimum) and similarity before and after.

Conventions: images ``(B, 1, D, H, W)`` 0..255; displacements ``(B, 3, D, H, W)``
in voxels, pull-back from the fixed grid (``README``, "Conventions").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from lumireg import __version__, contract
from lumireg.contract import NCC_WINDOW
from lumireg.evaluate.metrics import jacobian_determinant, ndv_percent
from lumireg.kernels import local_ncc


def quality_report(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    warped: torch.Tensor,
    displacement: torch.Tensor,
    model: str,
    passes: int = 1,
) -> list[dict]:
    """One QC dict per pair.

    Keys: ``ndv_percent`` (non-diffeomorphic volume in % of the moving image's
    nonzero voxels, LUMIR's definition: :func:`lumireg.evaluate.metrics.ndv_percent`),
    ``ncc_before`` / ``ncc_after`` (mean local NCC, window :data:`~lumireg.contract.NCC_WINDOW`, of fixed vs
    moving and fixed vs warped; 1 = identical up to local affine intensity
    changes), ``jacobian_min`` (smallest central-difference Jacobian
    determinant; <= 0 means folding), ``passes`` (network passes composed),
    ``model`` and ``version`` (lumireg's).

    Args:
        fixed, moving, warped: ``(B, 1, D, H, W)`` on one device, any real dtype (0..255).
        displacement: ``(B, 3, D, H, W)`` voxels.
        model: the name of the weights, reported as is.
        passes: the network passes that made ``displacement``, reported as is.
    """

    def folding() -> list[tuple[float, float]]:  # on the field's device; the metrics take [D, H, W, 3]
        fields = [field.permute(1, 2, 3, 0) for field in displacement]
        return [
            (ndv_percent(field, mask), float(jacobian_determinant(field).min()))
            for field, mask in zip(fields, moving[:, 0])
        ]

    # the geometry beside the NCCs: the two overlap on a CPU with more than one core
    with ThreadPoolExecutor(1) as pool:
        geometry = pool.submit(folding)
        # on 0..1 intensities, as the training loss, so the 1e-5 guard of flat regions means the same
        reference = fixed.float() / 255
        ncc_before = local_ncc(reference, moving.float() / 255, NCC_WINDOW).tolist()
        ncc_after = local_ncc(reference, warped.float() / 255, NCC_WINDOW).tolist()
        geometry = geometry.result()
    reports = []
    for (ndv, jacobian_min), before, after in zip(geometry, ncc_before, ncc_after):
        reports.append(
            {
                "ndv_percent": ndv,
                "ncc_before": before,
                "ncc_after": after,
                "jacobian_min": jacobian_min,
                "passes": passes,
                "model": model,
                "version": __version__,
            }
        )
    return reports


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
