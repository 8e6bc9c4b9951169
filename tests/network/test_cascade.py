"""lumireg.network.cascade: composition of pull-back fields, the cascade and its inverse."""

import pytest
import torch

from lumireg.kernels import integrate, warp
from lumireg.network.cascade import cascade, cascade_inverse, coarse_pass, compose
from lumireg.network.model import half_to_full, velocity_to_displacement
from lumireg.train.synthetic import gaussian_blur

SHAPE = (16, 20, 24)


def _smooth(channels, scale, seed, shape=SHAPE):
    noise = torch.randn(1, channels, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    field = gaussian_blur(noise, (3, 3, 3))
    return field * (scale / field.abs().max())


def test_compose_equals_warping_twice():
    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in SHAPE), indexing="ij")
    image = (torch.sin(0.4 * i) + torch.cos(0.3 * j) + torch.sin(0.35 * k))[None, None]
    outer, inner = _smooth(3, 6.0, 1), _smooth(3, 6.0, 2)
    twice = warp(warp(image, outer, padding="border"), inner, padding="border")
    once = warp(image, compose(outer, inner), padding="border")
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    inner_effect = (warp(image, outer, padding="border") - once)[interior].abs().max()
    # trilinear resampling of a smooth image: the two differ by interpolation error only
    assert (twice - once)[interior].abs().max() < 0.25 * inner_effect
    assert inner_effect > 0.2


def test_translations_add_exactly():
    shift = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    shift[:, 0], shift[:, 2] = 1.5, -0.75
    total = compose(shift, 2 * shift)
    torch.testing.assert_close(total, 3 * shift, rtol=0, atol=1e-12)


def _replaying(seeds):
    """A network returning smooth half-resolution velocities, one per seed in turn, and recording what it saw."""
    half = tuple(n // 2 for n in SHAPE)
    velocities, seen = [_smooth(3, 0.4, seed, half).float() for seed in seeds], []

    def network(fixed, moving):
        seen.append(moving.clone())
        return velocities[len(seen) - 1]

    return network, velocities, seen


def test_one_pass_is_the_network_alone_and_later_passes_see_the_warped_moving_image():
    network, velocities, seen = _replaying((10, 11))
    fixed = torch.randint(0, 256, (1, 1, *SHAPE), dtype=torch.uint8)
    moving = torch.randint(0, 256, (1, 1, *SHAPE), dtype=torch.uint8)
    alone, _ = cascade(network, fixed, moving, 1)
    torch.testing.assert_close(alone, velocity_to_displacement(velocities[0]))
    seen.clear()
    displacement, returned = cascade(network, fixed, moving, 2)
    assert len(returned) == 2 and seen[1].dtype == torch.uint8 and torch.equal(seen[0], moving)
    expected = warp(moving.float(), velocity_to_displacement(velocities[0])).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(seen[1], expected)
    # composed at half resolution, then brought to full resolution once
    halves = [integrate(v) for v in velocities]
    torch.testing.assert_close(displacement, half_to_full(compose(halves[0], halves[1])))


def test_composing_at_half_resolution_matches_composing_at_full_resolution():
    """By interpolation only: under a hundredth of a voxel on average, a tenth at most, for displacements of 3."""
    half = tuple(n // 2 for n in SHAPE)
    first, second = (integrate(_smooth(3, 2.0, seed, half)) for seed in (12, 13))
    at_half = half_to_full(compose(first, second))
    at_full = compose(half_to_full(first), half_to_full(second))
    interior = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    difference = (at_half - at_full)[interior].abs()
    assert at_full.abs().max() > 2.5
    assert difference.mean() < 0.01 and difference.max() < 0.1


def test_an_affine_start_is_composed_and_each_later_pass_resamples_the_moving_image_once():
    from lumireg.network.align import affine_displacement, compose_with
    from lumireg.network.cascade import resample_like

    network, velocities, seen = _replaying((14, 15))
    matrix = torch.eye(4)[None].clone()
    matrix[0, :3, :3] = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.1, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    matrix[0, :3, 3] = torch.tensor([0.7, -1.2, 0.4])
    fixed = torch.randint(0, 256, (1, 1, *SHAPE), dtype=torch.uint8)
    moving = torch.randint(0, 256, (1, 1, *SHAPE), dtype=torch.uint8)
    aligned = resample_like(moving, affine_displacement(matrix, SHAPE))
    displacement, _ = cascade(network, fixed, moving, 2, matrix=matrix, aligned=aligned)
    first = half_to_full(integrate(velocities[0]))
    assert torch.equal(seen[0], aligned)
    # the second pass: the original moving image through the affine after the first pass, one interpolation
    assert torch.equal(seen[1], resample_like(moving, compose_with(matrix, first)))
    passes = half_to_full(compose(integrate(velocities[0]), integrate(velocities[1])))
    torch.testing.assert_close(displacement, compose_with(matrix, passes))
    seen.clear()  # without the aligned copy, the cascade makes it
    cascade(network, fixed, moving, 1, matrix=matrix)
    assert torch.equal(seen[0], aligned)


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_inverse_undoes_the_cascade(passes):
    half = tuple(n // 2 for n in SHAPE)
    velocities = iter(_smooth(3, 0.5, 20 + k, half).float() for k in range(passes))
    image = torch.zeros(1, 1, *SHAPE)
    displacement, used = cascade(lambda f, m: next(velocities), image, image, passes)
    inverse = cascade_inverse(used)
    interior = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    for forth, back in ((displacement, inverse), (inverse, displacement)):
        residual = compose(forth, back)[interior].abs().max()
        assert residual < 0.05 * displacement.abs().max(), residual
    assert displacement.abs().max() > 0.3


def test_passes_below_one_are_refused():
    with pytest.raises(ValueError, match="passes"):
        cascade(lambda f, m: None, torch.zeros(1, 1, *SHAPE), torch.zeros(1, 1, *SHAPE), 0)


COARSE_SHAPE = (16, 24, 32)  # halves 8, 12, 16: framed in zeros up to multiples of 16
EXACT_SHAPE = (32, 64, 96)  # halves 16, 32, 48: the network sees the halved pair as it is (so does the canvas)


def _framing(shape):
    """The halved size, the size the network sees, and where the halved image sits in it (as the docstring says)."""
    half = [n // 2 for n in shape]
    seen = [-(-h // 16) * 16 for h in half]
    start = [(f - h) // 4 * 2 for f, h in zip(seen, half)]
    return half, seen, tuple(slice(s, s + h) for s, h in zip(start, half))


@pytest.mark.parametrize("shape", [EXACT_SHAPE, COARSE_SHAPE], ids=["exact", "framed"])
def test_coarse_pass_shows_the_network_the_halved_pair(shape):
    half, size, inner = _framing(shape)
    seen = []

    def network(fixed, moving):
        seen.append((fixed.clone(), moving.clone()))
        return torch.zeros(1, 3, *(n // 2 for n in fixed.shape[2:]))

    fixed = torch.randint(0, 256, (1, 1, *shape), dtype=torch.uint8)
    moving = torch.randint(0, 256, (1, 1, *shape), dtype=torch.uint8)
    coarse_pass(network)(fixed, moving)
    for shown, image in zip(seen[0], (fixed, moving)):
        assert shown.dtype == torch.uint8 and tuple(shown.shape[2:]) == tuple(size)  # an eighth of the voxels, or so
        halved = torch.nn.functional.avg_pool3d(image.float(), 2).round()
        assert torch.equal(shown[(..., *inner)].float(), halved)
        frame = shown.clone()
        frame[(..., *inner)] = 0
        assert not frame.any()  # zeros around the halved image, if any


@pytest.mark.parametrize("shape", [EXACT_SHAPE, COARSE_SHAPE], ids=["exact", "framed"])
def test_coarse_pass_velocity_is_the_part_of_the_networks_under_the_halved_pair(shape):
    """The network's velocity for the halved pair, in units of 4 voxels on a grid of 4-voxel steps, is the pair's
    quarter-resolution velocity: the part of its grid under the halved images, values as they are."""
    half, size, inner = _framing(shape)
    grid = [n // 2 for n in size]  # the velocity grid of what the network saw
    seen = torch.randn(1, 3, *grid, generator=torch.Generator().manual_seed(5))
    velocity = coarse_pass(lambda f, m: seen)(torch.zeros(1, 1, *shape), torch.zeros(1, 1, *shape))
    assert velocity.shape == (1, 3, *(n // 4 for n in shape))
    assert torch.equal(velocity, seen[(..., *[slice(i.start // 2, i.stop // 2) for i in inner])])


def test_the_coarse_velocity_is_integrated_on_its_grid_and_doubled_onto_the_half_grid():
    """A constant quarter-resolution velocity of c quarter voxels moves everything by 2c half-resolution voxels (4c
    voxels); the cascade's field is that of the integration on the quarter grid, brought up twice."""
    from lumireg.kernels import integrate
    from lumireg.network.model import half_to_full

    constant = torch.tensor([0.5, -1.0, 0.25]).view(1, 3, 1, 1, 1)
    quarter = tuple(n // 4 for n in EXACT_SHAPE)
    smooth = _smooth(3, 0.3, 40, quarter).float()
    calls = iter([constant.expand(1, 3, *quarter), torch.zeros(1, 3, *(n // 2 for n in EXACT_SHAPE))])
    image = torch.zeros(1, 1, *EXACT_SHAPE)
    displacement, used = cascade(lambda f, m: next(calls), image, image, 1, coarse=1)
    assert used[0].shape == (1, 3, *quarter)
    centre = displacement[..., 16, 32, 48]  # 4 quarter voxels from the edges, where the integration pads zeros
    torch.testing.assert_close(centre, 4 * constant.view(1, 3), atol=1e-4, rtol=0)
    calls = iter([smooth, torch.zeros(1, 3, *(n // 2 for n in EXACT_SHAPE))])
    displacement, _ = cascade(lambda f, m: next(calls), image, image, 1, coarse=1)
    torch.testing.assert_close(displacement, half_to_full(half_to_full(integrate(smooth, 7))))


@pytest.mark.parametrize("shape", [EXACT_SHAPE, COARSE_SHAPE], ids=["exact", "framed"])
def test_a_coarse_pass_comes_first_and_the_cascade_stays_invertible(shape):
    half = tuple(n // 2 for n in shape)
    calls = []

    def network(fixed, moving):
        calls.append(fixed.shape)
        return _smooth(3, 0.5, 30 + len(calls), tuple(n // 2 for n in fixed.shape[2:])).float()

    image = torch.zeros(1, 1, *shape)
    displacement, used = cascade(network, image, image, 2, coarse=1)
    assert len(used) == 3 and len(calls) == 3 and all(v.shape == (1, 3, *half) for v in used[1:])
    assert used[0].shape == (1, 3, *(n // 2 for n in half))  # the coarse pass's, on the quarter grid
    inverse = cascade_inverse(used)
    # the coarse field is integrated on the quarter grid, whose zero-padded edge reaches about 1.5 of its voxels in
    interior = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert compose(displacement, inverse)[interior].abs().max() < 0.05 * displacement.abs().max()
    with pytest.raises(ValueError, match="coarse"):
        cascade(network, image, image, 1, coarse=2)


def test_a_coarse_pass_brings_the_bundled_network_closer_on_a_held_out_pair(network, pair):
    from lumireg.kernels import local_ncc

    fixed, moving = (torch.from_numpy(pair[k]) for k in ("fixed", "moving"))
    similarity = {}
    with torch.no_grad():
        for coarse in (0, 1):
            displacement, _ = cascade(network, fixed, moving, 1, coarse=coarse)
            warped = warp(moving.float() / 255, displacement)
            similarity[coarse] = float(local_ncc(fixed.float() / 255, warped).mean())
    assert similarity[1] > similarity[0]
