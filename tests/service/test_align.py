"""Request parameter ``align``: a moving image in scanner pose is aligned first; every output is the whole transform."""

import json
import math

import numpy as np
import pytest
import torch

from lumireg.kernels import warp
from lumireg.network import align
from lumireg.service.pipeline import register_in_process

POSE_DEGREES = 20


def pose(shape, degrees=POSE_DEGREES, axis=(1, 0, 1), shift=(12.0, -15.0, 8.0)) -> torch.Tensor:
    """``(1, 4, 4)`` pull-back matrix: a rotation about the canvas centre, then a shift (voxels = mm)."""
    axis = torch.tensor(axis, dtype=torch.float64)
    x, y, z = (axis / axis.norm() * math.radians(degrees)).tolist()
    rotation = torch.linalg.matrix_exp(torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=torch.float64))
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre + torch.tensor(shift, dtype=torch.float64) - rotation @ centre
    return matrix[None]


def posed(image: np.ndarray, labels: bool = False) -> np.ndarray:
    """``image`` (``(1, 1, D, H, W)``) re-posed like a scan in scanner pose: ``posed(x) = image(P x)``."""
    tensor = torch.from_numpy(image)
    shift = align.affine_displacement(pose(image.shape[2:]), image.shape[2:])
    if labels:
        return warp(tensor, shift, mode="nearest").numpy()
    return align.resample(tensor, pose(image.shape[2:]).float()).numpy()


@pytest.fixture(scope="module")
def aligned(network, pair):
    """The test pair with its moving image (and labels) in scanner pose, registered with align=affine."""
    return register_in_process(
        network,
        pair["fixed"],
        posed(pair["moving"]),
        ["displacement", "inverse_displacement", "warped", "warped_labels", "qc"],
        moving_labels=posed(pair["moving_labels"], labels=True),
        align="affine",
    )


def test_a_posed_moving_image_registers_like_the_pre_aligned_one(network, pair, aligned):
    plain = register_in_process(
        network, pair["fixed"], pair["moving"], ["warped", "warped_labels"], moving_labels=pair["moving_labels"]
    )
    unaligned = register_in_process(network, pair["fixed"], posed(pair["moving"]), ["warped"])
    error = (aligned["warped"] - plain["warped"]).abs().mean()
    assert error < 0.3 * (unaligned["warped"] - plain["warped"]).abs().mean()
    # the labels follow the whole transform: mostly the same voxels as without the pose
    agree = (aligned["warped_labels"] == plain["warped_labels"]).float().mean()
    assert agree > 0.9


def test_every_output_has_the_wire_shape_and_the_qc_reports_the_alignment(aligned):
    assert aligned["displacement"].shape == (1, 3, 160, 224, 192)
    assert aligned["inverse_displacement"].shape == (1, 3, 160, 224, 192)
    assert aligned["warped"].shape == aligned["warped_labels"].shape == (1, 1, 160, 224, 192)
    assert torch.isfinite(aligned["displacement"]).all() and torch.isfinite(aligned["inverse_displacement"]).all()
    qc = json.loads(aligned["qc"][0])
    record = qc["alignment"]
    assert record["mode"] == "affine" and record["converged"]
    assert record["angle_degrees"] == pytest.approx(POSE_DEGREES, abs=3)
    assert len(record["matrix_voxels"]) == 4 and len(record["matrix_mm"]) == 4 and len(record["shift_mm"]) == 3
    assert not [w for w in qc.get("warnings", []) if w["code"] in ("alignment_not_converged", "not_brain_extracted")]


def test_the_inverse_undoes_the_whole_transform(aligned, pair):
    forward, inverse = aligned["displacement"], aligned["inverse_displacement"]
    # inverse o forward: x + forward(x) + inverse(x + forward(x)) = x inside the brain
    residual = (forward + warp(inverse, forward, padding="border")).norm(dim=1)[0]
    brain = torch.from_numpy(pair["fixed"][0, 0] > 0)
    assert residual[brain].mean() < 0.5


def test_an_empty_moving_image_falls_back_with_a_warning_and_no_nan(network, pair):
    out = register_in_process(
        network, pair["fixed"], np.zeros_like(pair["moving"]), ["displacement", "qc"], align="rigid"
    )
    assert torch.isfinite(out["displacement"]).all()
    qc = json.loads(out["qc"][0])
    assert not qc["alignment"]["converged"]
    assert "alignment_not_converged" in [w["code"] for w in qc["warnings"]]


def test_a_head_that_is_not_skull_stripped_is_flagged(network, pair):
    head = pair["moving"].copy()
    head[head == 0] = 60  # everything around the brain bright: scalp, skull, neck
    out = register_in_process(network, pair["fixed"], head, ["qc"], align="rigid")
    assert "not_brain_extracted" in [w["code"] for w in json.loads(out["qc"][0])["warnings"]]
