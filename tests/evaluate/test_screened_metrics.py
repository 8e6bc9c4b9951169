"""The QC's screened NDV and Jacobian minimum against the evaluator's float64 reference: the same numbers on the
bundled network's fields, on folding ones, in every dtype and mask type, and on the degenerate fields a screen
could get wrong (ties, tiny or non-finite values); and the work the screens leave out."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lumireg.evaluate import metrics
from lumireg.evaluate.metrics import jacobian_determinant, ndv_percent, screened_jacobian_min, screened_ndv_percent

HALF = (80, 112, 96)  # LUMIR's canvas at 2 mm: the network's fields in a second


def reference(disp, mask) -> tuple[float, float]:
    return ndv_percent(disp, mask), float(jacobian_determinant(disp).min())


def screened(disp, mask) -> tuple[float, float]:
    return screened_ndv_percent(disp, mask), screened_jacobian_min(disp)


def assert_same(disp, mask) -> tuple[float, float]:
    """NDV equal but for the float64 sum's order, the minimum bit for bit; returns the reference."""
    expected, got = reference(disp, mask), screened(disp, mask)
    assert got[0] == pytest.approx(expected[0], rel=1e-12, abs=0) or (np.isnan(got[0]) and np.isnan(expected[0]))
    assert got[1] == expected[1] or (np.isnan(got[1]) and np.isnan(expected[1]))
    return expected


def smooth_noise(shape, rms: float, generator: torch.Generator, sigma: int = 2) -> torch.Tensor:
    """``[3, *shape]`` float32 noise box-smoothed over ``2 sigma + 1`` voxels, scaled to ``rms`` voxels."""
    x = torch.randn(1, 3, *shape, generator=generator)
    for axis in range(3):
        kernel, pad = [1, 1, 1], [0] * 6
        kernel[axis], pad[4 - 2 * axis], pad[5 - 2 * axis] = 2 * sigma + 1, sigma, sigma
        x = F.avg_pool3d(F.pad(x, pad, mode="replicate"), kernel, stride=1)
    return x[0] * (rms / x.std())


@pytest.fixture(scope="module")
def network_field():
    """The bundled network's field on a held-out synthetic pair at half size: ``[3, D, H, W]`` and the moving image."""
    from lumireg.network import load_model
    from lumireg.train.synthetic import evaluation_seeds, synthetic_pair

    sample = synthetic_pair(evaluation_seeds(2)[1], shape=HALF, labels=False)
    with torch.inference_mode():
        disp = load_model()(sample["fixed"][None], sample["moving"][None])[0]
    return disp.contiguous(), (sample["moving"][0] * 255).round().to(torch.uint8)


@pytest.mark.parametrize("rms", [0.0, 0.35, 0.7])  # the network's own field, then folding a little, then a lot
def test_screened_measures_equal_the_reference_on_network_fields(network_field, rms):
    disp, moving = network_field
    noise = smooth_noise(HALF, rms, torch.Generator().manual_seed(7))  # a fixed draw: each case stays what it is
    ndv, minimum = assert_same((disp + noise).permute(1, 2, 3, 0), moving)
    assert (ndv > 0) == (minimum < 0) == (rms > 0)
    assert_same((disp + noise).permute(1, 2, 3, 0), None)


def test_screened_measures_equal_the_reference_on_the_full_canvas(pair, in_process):
    """The bundled network's field on the held-out pair at LUMIR's size: the moving brain's real bounding box."""
    field = torch.from_numpy(in_process["displacement"][0]).permute(1, 2, 3, 0)
    moving = torch.from_numpy(pair["moving"][0, 0])
    ndv, minimum = assert_same(field, moving)
    assert ndv == 0.0 and 0 < minimum < 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_screened_in_their_precision(network_field, dtype, rng):
    disp, moving = network_field
    field = (disp + smooth_noise(HALF, 0.4, rng)).to(dtype).permute(1, 2, 3, 0)
    assert reference(field, moving)[0] > 0
    assert_same(field, moving)


def test_any_mask_type_counts_where_positive(network_field, rng):
    disp, moving = network_field
    field = (disp + smooth_noise(HALF, 0.4, rng)).permute(1, 2, 3, 0)
    for mask in (moving > 0, moving.float() - 100, moving.to(torch.int32), (moving > 0).to(torch.uint8) * 3):
        assert_same(field, mask)
    with pytest.raises(ValueError, match="does not match"):
        screened_ndv_percent(field, moving[:-1])


def test_the_screens_compute_no_float64_determinant_where_nothing_folds(network_field, monkeypatch):
    """Not one exact NDV determinant for an unfolded field, and no screening outside the mask's rows and box."""
    disp, moving = network_field
    exact, blocks = [], []
    monkeypatch.setattr(metrics, "_exact_folded_points", lambda *a: exact.append(a) or 0.0)
    monkeypatch.setattr(metrics, "_exact_folded_block", lambda *a: exact.append(a) or 0.0)
    screen = metrics._digital_screen
    monkeypatch.setattr(metrics, "_digital_screen", lambda block, *a: blocks.append(block) or screen(block, *a))
    mask = torch.zeros(HALF, dtype=torch.uint8)
    mask[20:41, 30:52, 11:70] = 1  # a box: the screened rows are 20..40, each with its one-voxel halo
    assert screened_ndv_percent(disp.permute(1, 2, 3, 0), mask) == 0.0
    assert not exact
    assert len(blocks) == 6 and all(tuple(b.shape[1:]) == (6, 24, 61) for b in blocks)  # 6 slabs of 4 rows


def test_ties_tiny_and_constant_fields(rng):
    shape = (12, 10, 9)
    zero = torch.zeros(*shape, 3)
    assert screened(zero, None) == reference(zero, None) == (0.0, 1.0)  # every determinant ties with the minimum
    assert_same(zero + 3.7, None)  # a translation
    assert_same(smooth_noise(shape, 1e-7, rng, 1).permute(1, 2, 3, 0), None)  # T = disp + x rounds in float64
    big = smooth_noise(shape, 30.0, rng, 1).permute(1, 2, 3, 0)  # folds nearly everywhere
    assert assert_same(big, torch.rand(shape, generator=rng) > 0.5)[0] > 10


def test_what_the_screens_cannot_bound_takes_the_reference(rng):
    shape = (9, 8, 7)
    field = smooth_noise(shape, 0.5, rng, 1).permute(1, 2, 3, 0).contiguous()
    field[4, 4, 4, 1] = float("nan")
    got = screened(field, None)
    assert np.isnan(got[0]) and np.isnan(got[1]) and all(np.isnan(reference(field, None)))
    field[4, 4, 4, 1] = 3e7  # a difference past the screens' limit
    assert_same(field, None)
    assert_same(smooth_noise((3, 8, 7), 0.5, rng, 1).permute(1, 2, 3, 0), None)  # a side under 4 voxels
    numpy_field = smooth_noise(shape, 0.5, rng, 1).permute(1, 2, 3, 0).numpy()
    assert screened(numpy_field, None) == reference(numpy_field, None)
    assert np.isnan(screened_ndv_percent(numpy_field, np.zeros(shape)))  # an empty mask


def test_screens_run_on_the_fields_device(network_field, triton_device, rng):
    disp, moving = network_field
    field = (disp + smooth_noise(HALF, 0.4, rng)).permute(1, 2, 3, 0)
    expected = reference(field, moving)
    device_field, device_mask = field.to(triton_device), moving.to(triton_device)
    assert screened_ndv_percent(device_field, device_mask) == pytest.approx(expected[0], rel=1e-12)
    assert screened_jacobian_min(device_field) == expected[1]
