"""lumireg.network.refine: instance optimisation of the network's velocity."""

import pytest
import torch

from lumireg.kernels import warp
from lumireg.network.cascade import cascade, cascade_inverse
from lumireg.network.model import velocity_to_displacement
from lumireg.network.refine import half_resolution, refine, symmetric_similarity
from lumireg.train.synthetic import gaussian_blur

SHAPE = (24, 28, 32)
HALF = tuple(n // 2 for n in SHAPE)


def _smooth(channels, shape, seed, sigma):
    noise = torch.randn(1, channels, *shape, generator=torch.Generator().manual_seed(seed))
    return gaussian_blur(noise, (sigma,) * 3)


def _image():
    """A textured image, 0..255 float: structure everywhere, so every displacement shows."""
    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in SHAPE), indexing="ij")
    return (127.5 * (1 + (torch.sin(0.5 * i) * torch.cos(0.45 * j) + torch.sin(0.4 * k + 0.3 * i)) / 2))[None, None]


def _velocity(seed, amplitude):
    field = _smooth(3, HALF, seed, 2.5)
    return field * (amplitude / field.abs().max())


def _known_pair(amplitude=1.2):
    """(fixed, moving, true half-resolution velocity): moving(x + u(x)) = fixed(x), u = exp of the velocity."""
    fixed = _image()
    true = _velocity(7, amplitude)
    # warped(x) = moving(x + u(x)); moving = fixed o exp(-v) makes exp(v) the answer
    return fixed, warp(fixed, velocity_to_displacement(-true)), true


def test_zero_iterations_return_the_network_velocity_untouched():
    fixed, moving, true = _known_pair()
    velocity = torch.zeros(1, 3, *HALF)
    refined, reports = refine(velocity, fixed, moving, 0)
    assert refined is velocity and reports == []


def test_refinement_recovers_a_known_deformation_and_reports_its_similarity():
    fixed, moving, true = _known_pair()
    start = torch.zeros(1, 3, *HALF)
    refined, [report] = refine(start, fixed, moving, 40)
    assert report["converged"] and report["steps"] == 40 and report["similarity"] == "ncc"
    # before: 0.963; the update's grid has only 3 x 4 x 4 points on this 12 x 14 x 16 velocity, still near 1 after
    assert report["after"] > report["before"] + 0.02 and report["after"] > 0.99
    assert (refined - true).abs().mean() < 0.7 * true.abs().mean()
    displacement = velocity_to_displacement(refined)
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    error_before = (moving - fixed)[interior].abs().mean()
    error_after = (warp(moving, displacement) - fixed)[interior].abs().mean()
    assert error_after < 0.6 * error_before  # the full-resolution images now agree
    half = [half_resolution(image) for image in (fixed, moving)]
    measured = symmetric_similarity(refined, *half, "ncc", 7)
    torch.testing.assert_close(measured, torch.tensor([report["after"]]))


def test_refinement_is_antisymmetric_in_the_pair():
    fixed, moving, _ = _known_pair()
    start = _velocity(3, 0.3)
    forward, _ = refine(start, fixed, moving, 5)
    backward, _ = refine(-start, moving, fixed, 5)
    torch.testing.assert_close(forward, -backward, rtol=0, atol=1e-5)


def test_a_pair_that_cannot_improve_keeps_the_network_velocity_and_says_so():
    fixed = _image()
    start = torch.zeros(1, 3, *HALF)  # identical images: the identity is already the best
    refined, [report] = refine(start, fixed, fixed.clone(), 3, learning_rate=0.5)
    assert not report["converged"]
    assert torch.equal(refined, start)


def test_each_pair_of_a_batch_is_refined_on_its_own():
    fixed, moving, _ = _known_pair()
    batch_fixed, batch_moving = torch.cat([fixed, fixed]), torch.cat([moving, fixed])
    refined, reports = refine(torch.zeros(2, 3, *HALF), batch_fixed, batch_moving, 10)
    alone, [report] = refine(torch.zeros(1, 3, *HALF), fixed, moving, 10)
    torch.testing.assert_close(refined[:1], alone, rtol=0, atol=1e-6)
    assert reports[0] == pytest.approx(report) and not reports[1]["converged"]


def test_cascade_refines_only_the_last_pass_and_the_inverse_stays_exact():
    fixed, moving, _ = _known_pair()
    calls = []

    first = _velocity(5, 0.5)

    def network(f, m):
        return first.clone()

    def refine_last(f, seen, velocity):
        calls.append(seen)
        return refine(velocity, f, seen, 10)[0]

    displacement, velocities = cascade(network, fixed, moving, 2, refine_last=refine_last)
    assert len(calls) == 1  # the second pass's view: moving warped by the first pass
    torch.testing.assert_close(calls[0], warp(moving, velocity_to_displacement(first)))
    assert torch.equal(velocities[0], first) and not torch.equal(velocities[1], first)
    inverse = cascade_inverse(velocities)
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    round_trip = displacement + warp(inverse, displacement, padding="border")
    largest = displacement.abs().max()  # the round trip is off by interpolation error only
    assert round_trip[interior].abs().mean() < 0.01 * largest and round_trip[interior].abs().max() < 0.1 * largest


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"similarity": "ssd"}, "similarity must be one of"),
        ({"iterations": -1}, "iterations must be a non-negative int"),
        ({"velocity": torch.zeros(1, 3, 4, 4, 4)}, "not on the half-resolution grid"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    fixed, moving, _ = _known_pair()
    arguments = {"velocity": torch.zeros(1, 3, *HALF), "fixed": fixed, "moving": moving, "iterations": 1}
    with pytest.raises(ValueError, match=message):
        refine(**{**arguments, **kwargs})


def test_refinement_runs_under_a_callers_inference_mode():
    fixed, moving, _ = _known_pair()
    with torch.inference_mode():
        refined, [report] = refine(torch.zeros(1, 3, *HALF), fixed, moving, 3)
    assert report["converged"] and refined.abs().max() > 0
