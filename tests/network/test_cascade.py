"""lumireg.network.cascade: composition of pull-back fields, the cascade and its inverse."""

import pytest
import torch

from lumireg.kernels import warp
from lumireg.network.cascade import cascade, cascade_inverse, compose
from lumireg.network.model import velocity_to_displacement
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


def test_one_pass_is_the_network_alone_and_later_passes_see_the_warped_moving_image():
    half = tuple(n // 2 for n in SHAPE)
    velocities = [_smooth(3, 0.4, 10, half).float(), _smooth(3, 0.4, 11, half).float()]
    seen = []

    def network(fixed, moving):
        seen.append(moving.clone())
        return velocities[len(seen) - 1]

    fixed = torch.randint(0, 256, (1, 1, *SHAPE), dtype=torch.uint8)
    moving = torch.randint(0, 256, (1, 1, *SHAPE), dtype=torch.uint8)
    alone, _ = cascade(network, fixed, moving, 1)
    torch.testing.assert_close(alone, velocity_to_displacement(velocities[0]))
    seen.clear()
    displacement, returned = cascade(network, fixed, moving, 2)
    assert len(returned) == 2 and seen[1].dtype == torch.uint8 and torch.equal(seen[0], moving)
    expected = warp(moving.float(), velocity_to_displacement(velocities[0])).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(seen[1], expected)
    torch.testing.assert_close(displacement, compose(alone, velocity_to_displacement(velocities[1])))


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
