"""Oracles for the kernel tests: written independently of lumireg, run in float64."""

import pytest
import torch
import torch.nn.functional as F


def grid_sample_warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding: str = "zeros"):
    """``image(x + disp(x))`` with an explicit identity grid and ``F.grid_sample``, in float64."""
    sizes = image.shape[2:]
    identity = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in sizes], indexing="ij"))
    locations = identity.to(disp.device) + disp.double()
    normalised = [2 * locations[:, k] / (sizes[k] - 1) - 1 for k in range(3)]
    grid = torch.stack(normalised[::-1], dim=-1)  # grid_sample wants (x, y, z) = (W, H, D)
    return F.grid_sample(image.double(), grid, mode=mode, padding_mode=padding, align_corners=True)


def random_size(rng: torch.Generator) -> tuple[int, int, int]:
    """A volume size around 8 x 10 x 12, odd or even along each axis."""
    return tuple(int(torch.randint(base - 2, base + 3, (1,), generator=rng)) for base in (8, 10, 12))


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def oracle():
    """The test oracles and helpers, as one namespace."""

    class Oracle:
        warp = staticmethod(grid_sample_warp)
        size = staticmethod(random_size)
        rel_err = staticmethod(max_relative_error)

    return Oracle
