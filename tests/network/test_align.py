"""lumireg.network.align: the affine pre-alignment stage (request parameter ``align``)."""

import math

import pytest
import torch

from lumireg.benchmarks.align import corner_error_mm
from lumireg.contract import intensities_to_uint8
from lumireg.kernels import warp
from lumireg.network import align


@pytest.fixture(scope="module")
def brain():
    """A held-out synthetic brain on LUMIR's canvas, uint8 ``(1, 1, 160, 224, 192)``."""
    from lumireg.train.synthetic import evaluation_seeds, synthetic_pair

    sample = synthetic_pair(evaluation_seeds(3)[2])
    return torch.from_numpy(intensities_to_uint8(sample["fixed"].numpy()))[None]


def _pose(degrees, axis, shift_mm, scale=(1.0, 1.0, 1.0), shape=(160, 224, 192)) -> torch.Tensor:
    """A (4, 4) float64 pull-back matrix: rotation about ``axis`` and scaling about the canvas centre, then a shift."""
    axis = torch.tensor(axis, dtype=torch.float64)
    vector = axis / axis.norm() * math.radians(degrees)
    x, y, z = vector.tolist()
    rotation = torch.linalg.matrix_exp(torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=torch.float64))
    linear = rotation @ torch.diag(torch.tensor(scale, dtype=torch.float64))
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre + torch.tensor(shift_mm, dtype=torch.float64) - linear @ centre
    return matrix


def _posed(brain, pose):
    """``brain`` re-posed: ``posed(x) = brain(pose x)``, so the matrix that undoes it is ``inv(pose)``."""
    return align.resample(brain, pose[None].float()), torch.linalg.inv(pose)


def test_a_posed_copy_of_an_image_recovers_the_applied_affine_within_1_mm_at_the_brains_corners(brain):
    posed, true = _posed(brain, _pose(20, (1, -1, 1), (-20, 15, 10), scale=(1.05, 0.97, 1.0)))
    matrix, (report,) = align.estimate(brain, posed, "affine")
    assert report["converged"], report
    assert corner_error_mm(matrix[0], true, brain) < 1.0
    assert report["after"] > report["before"]
    assert len(report["matrix_voxels"]) == 4 and len(report["matrix_mm"]) == 4


@pytest.mark.parametrize(
    ("degrees", "axis", "shift", "mode"),
    [(10, (1, 1, 0), (10, -5, 5), "rigid"), (30, (0, 1, 0), (10, 20, -20), "affine")],
)
def test_rotations_of_10_to_30_degrees_and_shifts_up_to_30_mm_converge(brain, degrees, axis, shift, mode):
    posed, true = _posed(brain, _pose(degrees, axis, shift))
    matrix, (report,) = align.estimate(brain, posed, mode)
    assert report["converged"], report
    assert report["angle_degrees"] == pytest.approx(degrees, abs=1.5)
    assert corner_error_mm(matrix[0], true, brain) < 1.5
    if mode == "rigid":  # a rigid estimate is a rotation: orthonormal, no scaling
        linear = matrix[0, :3, :3].double()
        assert torch.allclose(linear @ linear.T, torch.eye(3, dtype=torch.float64), atol=1e-4)


def test_an_already_aligned_pair_keeps_the_identity(brain):
    matrix, (report,) = align.estimate(brain, brain, "affine")
    assert report["converged"]
    assert torch.allclose(matrix[0], torch.eye(4), atol=0.05)
    assert report["angle_degrees"] < 0.5


def _assert_centre_of_mass_fallback(matrix, report):
    assert torch.isfinite(matrix).all()
    assert not report["converged"] and report["reason"]
    assert torch.allclose(matrix[0, :3, :3], torch.eye(3)), "the fallback is the centre-of-mass shift alone"
    assert report["angle_degrees"] == 0.0


def test_an_empty_moving_image_falls_back_with_a_reason_and_no_nan(brain):
    matrix, (report,) = align.estimate(brain, torch.zeros_like(brain), "affine")
    _assert_centre_of_mass_fallback(matrix, report)
    assert "empty" in report["reason"]
    assert torch.allclose(matrix[0], torch.eye(4))


def test_content_that_cannot_overlap_the_brain_falls_back_to_the_centre_of_mass(brain):
    blob = torch.zeros_like(brain)
    blob[..., 8:24, 8:24, 8:24] = 200  # a small cube in a corner: nothing like the brain
    matrix, (report,) = align.estimate(brain, blob, "affine")
    _assert_centre_of_mass_fallback(matrix, report)


def test_a_diverging_optimisation_falls_back_to_the_centre_of_mass(brain, monkeypatch):
    monkeypatch.setattr(align, "LEARNING_RATES", {"rotation": 50.0, "shift": 1e4, "linear": 50.0})
    posed, _ = _posed(brain, _pose(10, (0, 0, 1), (5, 0, 0)))
    matrix, (report,) = align.estimate(brain, posed, "affine", iterations=(5, 1))
    _assert_centre_of_mass_fallback(matrix, report)


def test_each_pair_of_a_batch_is_aligned_on_its_own(brain):
    posed, true = _posed(brain, _pose(15, (1, 0, 0), (0, 10, 0)))
    matrix, reports = align.estimate(torch.cat([brain, brain]), torch.cat([brain, posed]), "rigid")
    assert [r["converged"] for r in reports] == [True, True]
    assert torch.allclose(matrix[0], torch.eye(4), atol=0.05)
    assert corner_error_mm(matrix[1], true, brain) < 1.5


def test_the_composed_displacement_is_the_affine_after_the_networks_field():
    shape = (16, 24, 32)
    generator = torch.Generator().manual_seed(3)
    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")
    image = (torch.sin(0.15 * i + 0.1 * j) * torch.cos(0.12 * k) + 1)[None, None]  # smooth: interpolation is near exact
    field = 1.5 * torch.sin(0.2 * (i + j + k))[None, None].expand(1, 3, *shape) + 0.3 * torch.randn(
        1, 3, *shape, generator=generator, dtype=torch.float64
    )
    matrix = _pose(8, (1, 2, 3), (1.0, -0.5, 0.3), scale=(1.02, 0.98, 1.0), shape=shape)[None]
    composed = align.compose_with(matrix, field.float()).double()
    direct = warp(align.resample(image, matrix.float()).double(), field)
    # exact where the field's sample points stay inside: the affine is linear, composing it interpolates nothing
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    error = (warp(image, composed) - direct)[inner].abs()
    assert error.mean() < 0.005 and error.median() < 0.005, error.max()
    inverse = align.inverse_affine_displacement(matrix, shape).double()
    identity = align.compose_with(matrix, inverse)  # M (x + inv(M) x - x) - x = 0
    assert identity.abs().max() < 1e-3


def test_bad_arguments_are_refused(brain):
    with pytest.raises(ValueError, match="mode"):
        align.estimate(brain, brain, "projective")
    with pytest.raises(ValueError, match="similarity"):
        align.estimate(brain, brain, "rigid", "ssd")
    with pytest.raises(ValueError, match="divisible"):
        align.estimate(brain[..., :20], brain[..., :20], "rigid")


def test_rodrigues_rotation_equals_the_matrix_exponential_and_has_a_gradient_at_zero(rng):
    vectors = torch.cat(
        [
            torch.randn(6, 3, generator=rng, dtype=torch.float64),  # up to a few radians
            1e-3 * torch.randn(3, 3, generator=rng, dtype=torch.float64),  # the Taylor branch
            torch.zeros(1, 3, dtype=torch.float64),
        ]
    )
    expected = torch.linalg.matrix_exp(align._skew(vectors))
    assert torch.allclose(align._rotation(vectors), expected, atol=1e-9)
    start = torch.zeros(1, 3, requires_grad=True)
    align._rotation(start)[0, 0, 1].backward()  # d R_01 / d r at the identity: -1 along z
    assert torch.allclose(start.grad, torch.tensor([[0.0, 0.0, -1.0]]))


def test_levels_are_block_means_of_the_full_resolution_image(rng):
    fixed, moving = (torch.randint(0, 256, (1, 1, 16, 24, 32), generator=rng, dtype=torch.uint8) for _ in range(2))
    levels = align._levels(fixed, moving, (8, 4))
    for factor in (8, 4):
        for image, level in zip((fixed, moving), levels[factor]):
            expected = image.double().div(255).unfold(2, factor, factor).unfold(3, factor, factor)
            expected = expected.unfold(4, factor, factor).mean((-1, -2, -3))
            assert torch.allclose(level.double(), expected, atol=1e-6)


def test_the_half_resolution_aligned_image_is_the_halved_one_at_the_identity_and_close_to_it_when_posed(brain):
    halved = align.halve(brain)
    assert torch.equal(align.resample_half(brain, torch.eye(4)[None]), halved)
    moved = _pose(20, (1, 2, 0), (8.0, -5.0, 12.0)).float()[None]
    fast, slow = align.resample_half(brain, moved).float(), align.halve(align.resample(brain, moved)).float()
    inside = slow > 0
    # one trilinear sample of the block means against the mean of eight samples: a blur's difference, not a shift
    assert (fast - slow)[inside].abs().mean() < 4 and abs(float((fast - slow)[inside].mean())) < 1
