"""The QC report: its similarity measures against the kernel ops they stand for, and its warnings where they are
deserved (a T1/T2 pair the bundled network makes worse, a folding field, a refinement that did not converge) and
nowhere else (a same-contrast pair the network registers well)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lumireg.contract import NDV_WARNING_PERCENT, QC_WARNINGS, intensities_to_uint8
from lumireg.kernels import local_ncc, mutual_information, warp
from lumireg.service import quality
from lumireg.service.quality import quality_report

KEYS = {
    "ndv_percent",
    "jacobian_min",
    "ncc_before",
    "ncc_after",
    "mi_before",
    "mi_after",
    "passes",
    "coarse",
    "refinement",
    "warnings",
    "model",
    "version",
}
# T2-like tissue intensities (background, CSF, grey matter, white matter): CSF bright, white matter dark, so the
# map from T1's order (background < CSF < GM < WM) rises, then falls
T2_LIKE = torch.tensor([0.0, 0.95, 0.6, 0.4])


def codes(report: dict) -> list[str]:
    assert all(w["message"] == QC_WARNINGS[w["code"]] for w in report["warnings"])
    return [w["code"] for w in report["warnings"]]


def smooth(shape, generator: torch.Generator, sigma: int = 2) -> torch.Tensor:
    """Unit-variance noise box-smoothed over ``2 sigma + 1`` voxels, ``shape``."""
    x = torch.randn(1, 1, *shape, generator=generator)
    for axis in range(3):
        kernel, pad = [1, 1, 1], [0] * 6
        kernel[axis], pad[4 - 2 * axis], pad[5 - 2 * axis] = 2 * sigma + 1, sigma, sigma
        x = F.avg_pool3d(F.pad(x, pad, mode="replicate"), kernel, stride=1)
    return x[0, 0] / x.std()


def brain(shape, generator: torch.Generator) -> torch.Tensor:
    """A ``(1, 1, *shape)`` uint8 image: smooth texture inside an ellipsoid, zero outside."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(a * a for a in axes) < 0.7
    texture = (smooth(shape, generator) * 40 + 140).clamp(1, 255)
    return torch.where(inside, texture, 0).round().to(torch.uint8)[None, None]


def test_half_sums_are_the_2x2x2_block_sums(rng):
    image = torch.randint(0, 256, (9, 12, 7), generator=rng, dtype=torch.uint8)  # odd sides: the last slice drops
    torch.testing.assert_close(quality.half_sums(image, planes=3), F.avg_pool3d(image[None].float(), 2)[0] * 8)


@pytest.mark.parametrize("window", [3, 5])
def test_local_ncc_is_the_kernels_on_the_same_images(window, rng):
    shape = (21, 14, 12)  # three slabs of 8 planes, the last one short
    fixed = brain(shape, rng)[0, 0].float() / 255
    moving = (fixed + 0.3 * smooth(shape, rng, 1)).clamp(0, 1) * (fixed > 0)
    warped = (1 - fixed) * (fixed > 0)  # inverted contrast: NCC is blind to the sign
    expected = local_ncc(torch.stack([fixed, fixed])[:, None], torch.stack([moving, warped])[:, None], window)
    got = torch.tensor(quality.local_ncc_sums(fixed, moving, warped, window), dtype=torch.float64)
    torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=1e-7)
    assert quality.local_ncc_sums(torch.zeros(shape), moving, warped, window) == [0.0, 0.0]


def test_mutual_information_is_the_kernels_over_the_fixed_brain(rng):
    shape = (18, 16, 14)
    fixed = brain(shape, rng)[0, 0]
    moving = brain(shape, rng)[0, 0]
    warped = moving.float() + torch.rand(shape, generator=rng) - 0.5  # real values: each at its nearest level
    mask = fixed > 0

    def kernel(other: torch.Tensor) -> float:
        def volume(x):  # the brain's voxels as a (1, 1, n, 2, 2) volume: duplicates leave a histogram's shares as is
            return (x[mask].double() / 255).view(1, 1, -1, 1, 1).expand(-1, -1, -1, 2, 2).contiguous()

        return float(mutual_information(volume(fixed), volume(other.double().clamp(0, 255).round())))

    got = quality.brain_mutual_information(fixed, moving, warped, planes=5)
    assert got == pytest.approx([kernel(moving), kernel(warped)], rel=1e-9)
    assert quality.brain_mutual_information(fixed, fixed)[0] > got[0] > 0  # an image predicts itself best
    assert quality.brain_mutual_information(torch.zeros_like(fixed), moving) == [0.0]


def _render(labels: np.ndarray, intensities: torch.Tensor) -> np.ndarray:
    """A ``(1, 1, D, H, W)`` uint8 image from canvas labels, one intensity per tissue (see train.canvas.LABELS)."""
    labels = torch.from_numpy(labels.astype(np.int64))
    tissue = torch.where(labels > 0, (labels - 1) // 8 + 1, 0)
    return intensities_to_uint8(intensities[tissue].numpy())[None, None]


def test_a_t1_t2_pair_the_network_makes_worse_is_flagged():
    """T1 fixed, T2-like moving rendered from the same labels: aligned before, so whatever the network does (trained
    on like contrasts, it matches unlike tissues) makes it worse; the brain's mutual information says so."""
    from lumireg.evaluate import dice
    from lumireg.export.onnx import VelocityGraph
    from lumireg.network.checkpoint import load_model
    from lumireg.service.pipeline import register_in_process
    from lumireg.train.canvas import LABELS, lumir_canvas

    canvas = lumir_canvas()
    graph = VelocityGraph(load_model())

    def network(fixed, moving):
        with torch.inference_mode():
            return graph(fixed, moving)

    fixed, moving = canvas.image[None, None].copy(), _render(canvas.labels, T2_LIKE)

    def registered(contrast: str) -> tuple[float, dict]:
        out = register_in_process(network, fixed, moving, ["displacement", "qc"], contrast=contrast)
        warped = warp(torch.from_numpy(canvas.labels[None, None].astype(np.float32)), out["displacement"], "nearest")
        return np.nanmean(dice(canvas.labels, warped[0, 0].numpy(), sorted(LABELS))), json.loads(out["qc"][0])

    made_worse, report = registered("same")  # told the contrasts are alike, the network matches unlike tissues
    assert made_worse < 0.8
    assert "similarity_decreased" in codes(report)
    assert report["mi_after"] < (1 - quality.MI_DROP) * report["mi_before"]
    # by default (contrast=auto) the server sees the two contrasts, maps them, and does no such harm
    kept, report = registered("auto")
    assert report["contrast"]["used"] == "other" and "similarity_decreased" not in codes(report)
    assert kept > made_worse + 0.1, (kept, made_worse)


def test_a_same_contrast_pair_that_registers_well_has_no_warning(pair, in_process):
    fixed, moving = (torch.from_numpy(pair[k]) for k in ("fixed", "moving"))
    displacement = torch.from_numpy(in_process["displacement"])
    (report,) = quality_report(fixed, moving, warp(moving.float(), displacement), displacement, "m")
    assert set(report) == KEYS and json.loads(json.dumps(report)) == report
    assert codes(report) == [] and report["refinement"] is None
    assert report["mi_after"] > 2 * report["mi_before"] and report["ncc_after"] > 2 * report["ncc_before"]
    assert report["ndv_percent"] == 0 and 0 < report["jacobian_min"] < 1


def test_folding_is_flagged_pair_by_pair(rng):
    shape = (32, 32, 32)
    fixed, moving = brain(shape, rng), brain(shape, rng)
    gentle = torch.stack([smooth(shape, rng) for _ in range(3)]) * 0.3
    folding = torch.stack([smooth(shape, rng, 1) for _ in range(3)]) * 3
    displacement = torch.stack([gentle, folding])
    images = torch.cat([fixed, fixed]), torch.cat([moving, moving])
    reports = quality_report(*images, warp(images[1].float(), displacement), displacement, "m", passes=2)
    assert reports[0]["ndv_percent"] == 0 and "folding" not in codes(reports[0])
    assert reports[1]["ndv_percent"] > NDV_WARNING_PERCENT and "folding" in codes(reports[1])
    assert reports[1]["jacobian_min"] < 0 and all(r["passes"] == 2 for r in reports)


def test_the_refinement_record_is_reported_and_non_convergence_flagged(rng):
    shape = (16, 16, 16)
    fixed, moving = brain(shape, rng), brain(shape, rng)
    displacement = torch.zeros(2, 3, *shape)
    images = torch.cat([fixed, fixed]), torch.cat([moving, moving])
    records = [
        {"steps": 20, "similarity": "mi", "before": 0.41, "after": 0.40, "converged": False},
        {"steps": 20, "similarity": "ncc", "before": 0.30, "after": 0.35, "converged": True},
    ]
    reports = quality_report(*images, images[1].float(), displacement, "m", refinement=records)
    assert [r["refinement"] for r in reports] == records
    assert "refinement_not_converged" in codes(reports[0]) and "refinement_not_converged" not in codes(reports[1])
    with pytest.raises(ValueError, match="2 pairs"):
        quality_report(*images, images[1].float(), displacement, "m", refinement=records[:1])
