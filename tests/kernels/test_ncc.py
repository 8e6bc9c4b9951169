"""local_ncc: the Triton kernels and the PyTorch twin against VoxelMorph's formula, gradients, properties."""

import pytest
import torch
import torch.nn.functional as F
import triton

from lumireg.kernels._dispatch import LAUNCH
from lumireg.kernels.ncc import _box_sums, local_ncc


def voxelmorph_ncc(fixed: torch.Tensor, moving: torch.Tensor, window: int) -> torch.Tensor:
    """VoxelMorph's NCC loss literally (without the minus sign), conv3d box sums, in float64."""
    I, J = fixed.double().cpu(), moving.double().cpu()  # noqa: E741 (VoxelMorph's names)
    channels = I.shape[1]
    ones = torch.ones(channels, 1, window, window, window, dtype=torch.float64)

    def box(x):
        return F.conv3d(x, ones, stride=1, padding=window // 2, groups=channels)

    win_size = window**3
    I_sum, J_sum, I2_sum, J2_sum, IJ_sum = box(I), box(J), box(I * I), box(J * J), box(I * J)
    u_I, u_J = I_sum / win_size, J_sum / win_size
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * win_size
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * win_size
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * win_size
    cc = cross * cross / (I_var * J_var + 1e-5)
    return cc.mean(dim=(1, 2, 3, 4))


def structured(shape, rng, dtype=torch.float32) -> torch.Tensor:
    """A smooth random field plus noise, in about [0, 1]: local windows are never flat."""
    coarse = torch.rand(shape[0], shape[1], 3, 3, 3, generator=rng, dtype=torch.float64)
    smooth = F.interpolate(coarse, size=shape[2:], mode="trilinear", align_corners=True)
    return (0.7 * smooth + 0.3 * torch.rand(shape, generator=rng, dtype=torch.float64)).to(dtype)


def pair(shape, rng, dtype=torch.float32):
    """A fixed image and a moving image correlated with it, so cc is well away from 0 and 1."""
    fixed = structured(shape, rng, torch.float64)
    moving = 0.6 * fixed + 0.4 * structured(shape, rng, torch.float64)
    return fixed.to(dtype), moving.to(dtype)


def random_shape(rng, batch, channels):
    """Around 8x10x12 in a random order: one even size, one odd, one anywhere in 4..13."""
    sizes = [
        2 * int(torch.randint(3, 7, (1,), generator=rng)),
        2 * int(torch.randint(3, 7, (1,), generator=rng)) + 1,
        int(torch.randint(4, 14, (1,), generator=rng)),
    ]
    order = torch.randperm(3, generator=rng).tolist()
    return (batch, channels, *(sizes[k] for k in order))


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected) / expected).abs().max().item()


def grad_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the largest gradient: per-voxel gradients cross zero."""
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max()).item()


CASES = [(1, 1, 3), (2, 3, 5), (1, 3, 9), (2, 1, 9)]


@pytest.mark.parametrize("batch,channels,window", CASES)
def test_triton_float32_matches_voxelmorph_formula(rng, triton_device, batch, channels, window):
    shape = random_shape(rng, batch, channels)
    fixed, moving = pair(shape, rng)
    out = local_ncc(fixed.to(triton_device), moving.to(triton_device), window, backend="triton")
    assert out.shape == (batch,) and out.dtype == torch.float32
    err = max_rel(out, voxelmorph_ncc(fixed, moving, window))
    assert err < 1e-5, f"shape {shape} window {window}: max relative error {err:.2e}"


@pytest.mark.parametrize("batch,channels,window", CASES)
def test_torch_twin_float32_matches_voxelmorph_formula(rng, batch, channels, window):
    shape = random_shape(rng, batch, channels)
    fixed, moving = pair(shape, rng)
    out = local_ncc(fixed, moving, window, backend="torch")
    assert out.shape == (batch,) and out.dtype == torch.float32
    err = max_rel(out, voxelmorph_ncc(fixed, moving, window))
    assert err < 1e-5, f"shape {shape} window {window}: max relative error {err:.2e}"


@pytest.mark.parametrize("window", [1, 3, 5, 7, 9, 11, 13])
def test_twin_box_sums_match_a_conv3d_of_ones_for_every_binary_pattern_of_the_window(rng, window):
    volume = torch.rand(2, 3, 7, 12, 15, generator=rng, dtype=torch.float64)  # the window can exceed an axis
    ones = torch.ones(3, 1, window, window, window, dtype=torch.float64)
    expected = F.conv3d(volume, ones, padding=window // 2, groups=3)
    assert torch.allclose(_box_sums(volume, window), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [3, 9])
def test_triton_float64_matches_voxelmorph_formula_tightly(rng, triton_device, window):
    shape = random_shape(rng, 2, 2)
    fixed, moving = pair(shape, rng, torch.float64)
    out = local_ncc(fixed.to(triton_device), moving.to(triton_device), window, backend="triton")
    assert out.dtype == torch.float64
    err = max_rel(out, voxelmorph_ncc(fixed, moving, window))
    assert err < 1e-12, f"shape {shape} window {window}: max relative error {err:.2e}"


def test_auto_backend_on_cpu_tensors_runs_the_twin(rng, monkeypatch):
    import importlib

    ncc_module = importlib.import_module("lumireg.kernels.ncc")  # the package attribute is the function

    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("the Triton kernels ran on CPU tensors under backend='auto'")

    monkeypatch.setattr(ncc_module, "ncc_forward", kernel_must_not_run)
    monkeypatch.setattr(ncc_module, "ncc_backward", kernel_must_not_run)
    fixed, moving = (t.requires_grad_() for t in pair((1, 1, 6, 7, 8), rng))
    out = local_ncc(fixed, moving, 3)
    out.sum().backward()
    assert torch.equal(out, local_ncc(fixed, moving, 3, backend="torch"))


def test_torch_twin_gradients_pass_gradcheck(rng):
    fixed, moving = pair((1, 1, 5, 6, 7), rng, torch.float64)
    fixed.requires_grad_()
    moving.requires_grad_()
    assert torch.autograd.gradcheck(lambda f, m: local_ncc(f, m, 3, backend="torch"), (fixed, moving))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_triton_gradients_match_twin_for_both_inputs(rng, triton_device, dtype, tol):
    shape = random_shape(rng, 2, 2)
    fixed, moving = pair(shape, rng, dtype)
    grad_out = torch.randn(2, generator=rng, dtype=torch.float64)
    ref = [t.double().clone().requires_grad_() for t in (fixed, moving)]
    local_ncc(*ref, 5, backend="torch").backward(grad_out)
    inputs = [t.to(triton_device).clone().requires_grad_() for t in (fixed, moving)]
    local_ncc(*inputs, 5, backend="triton").backward(grad_out.to(dtype).to(triton_device))
    for name, x, r in zip(("fixed", "moving"), inputs, ref):
        assert x.grad.dtype == dtype
        err = grad_error(x.grad, r.grad)
        assert err < tol, f"{name} shape {shape}: max gradient error {err:.2e} of the largest"


def test_triton_backward_from_kept_coefficients_repeats_and_no_grad_keeps_none(rng, triton_device, monkeypatch):
    """The forward keeps the gradient's coefficients only when a gradient will be taken; a second backward over
    the same graph (retain_graph) reads them unchanged and gives the same gradient."""
    import lumireg.kernels.ncc as ncc_module

    kept = []
    forward = ncc_module.ncc_forward

    def spy(*args):
        cc, coef = forward(*args)
        kept.append(coef)
        return cc, coef

    monkeypatch.setattr(ncc_module, "ncc_forward", spy)
    fixed, moving = (t.to(triton_device) for t in pair((1, 1, 6, 7, 8), rng, torch.float64))
    with torch.no_grad():
        plain = local_ncc(fixed, moving.clone().requires_grad_(), 5, backend="triton")
    moving.requires_grad_()
    cc = local_ncc(fixed, moving, 5, backend="triton")
    assert kept[0] is None and kept[1].shape == (1, 5, 6 * 7 * 8)
    assert torch.equal(cc.detach(), plain)
    first = torch.autograd.grad(cc, moving, retain_graph=True)[0]
    second = torch.autograd.grad(cc, moving)[0]
    assert torch.equal(first, second) and first.abs().max() > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_reaches_only_the_input_that_requires_it(rng, triton_device, backend):
    device = triton_device if backend == "triton" else "cpu"
    fixed, moving = (t.to(device) for t in pair((1, 2, 6, 7, 8), rng, torch.float64))
    moving.requires_grad_()
    local_ncc(fixed, moving, 3, backend=backend).sum().backward()
    assert fixed.grad is None
    # the reference differentiates VoxelMorph's formula (an independent code path) with both inputs live
    ref = [t.detach().cpu().clone().requires_grad_() for t in (fixed, moving)]
    voxelmorph_ncc(*ref, 3).sum().backward()
    assert grad_error(moving.grad, ref[1].grad) < 1e-12
    assert moving.grad.abs().max() > 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_image_with_itself_scores_one(rng, triton_device, backend):
    device = triton_device if backend == "triton" else "cpu"
    image = torch.rand(2, 1, 7, 8, 9, generator=rng).to(device)
    out = local_ncc(image, image, 5, backend=backend)
    # cc = var**2 / (var**2 + 1e-5) per voxel, var >> 1 here: 1 up to float32 rounding of the mean
    assert out.shape == (2,) and ((out.double() - 1).abs() <= 1e-6).all(), out


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale,shift", [(2.5, 0.3), (-0.7, 1.2)])
def test_invariant_to_affine_intensity_change_inside_a_zero_background(rng, triton_device, backend, scale, shift):
    # zero padding breaks shift invariance in windows that cross the volume edge; a zero
    # background as wide as 2 * (window // 2) makes cc exactly 0 there, whatever the shift
    window, margin = 3, 2
    device = triton_device if backend == "triton" else "cpu"
    fixed, moving = pair((1, 2, 7, 8, 9), rng, torch.float64)
    fixed = F.pad(fixed, (margin,) * 6)
    moving = F.pad(moving, (margin,) * 6) + structured(fixed.shape, rng, torch.float64)
    fixed, moving = fixed.float().to(device), moving.float().to(device)
    before = local_ncc(fixed, moving, window, backend=backend)
    after = local_ncc(fixed, scale * moving + shift, window, backend=backend)
    err = max_rel(after, before.double().cpu())
    assert err < 1e-4, f"a={scale} b={shift}: relative change {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_accepts_half_inputs_close_to_float32(rng, triton_device, dtype):
    fixed, moving = (t.to(triton_device) for t in pair((2, 1, 6, 7, 8), rng))
    ref = local_ncc(fixed, moving, 5, backend="triton")
    half = fixed.to(dtype), moving.to(dtype)
    out = local_ncc(*half, 5, backend="triton")
    assert out.dtype == torch.float32
    # accumulated in float32: on the rounded inputs it agrees with float64 to float32 precision
    exact = local_ncc(*(t.double().cpu() for t in half), 5, backend="torch")
    err = max_rel(out, exact)
    assert err < 1e-5, f"{dtype}: relative error {err:.2e} against float64 on the same half inputs"
    # rounding the inputs (relative error eps / 2 each) moves the mean cc by less than that
    # (measured: 0.04 eps for both dtypes)
    tol = torch.finfo(dtype).eps / 2
    err = max_rel(out, ref.double().cpu())
    assert err < tol, f"{dtype}: relative error {err:.2e} against float32 inputs, tolerance {tol:.1e}"


# LAUNCH[...].block = 1024 voxels per program along grid axis 0 (one plane b * C + c per grid axis 1): 11 * 13 * 17
# = 2431 voxels are 3 programs, the last one partial, and the D sweep (stride 13 * 17) reads across
# program boundaries. One plane keeps the interpreter to a few seconds; CASES cover several planes.
MULTI_BLOCK_SHAPE = (1, 1, 11, 13, 17)


def test_multi_block_shape_spans_three_programs_the_last_partial():
    BLOCK = LAUNCH["local_ncc"].block

    n = MULTI_BLOCK_SHAPE[2] * MULTI_BLOCK_SHAPE[3] * MULTI_BLOCK_SHAPE[4]
    assert triton.cdiv(n, BLOCK) == 3 and n % BLOCK != 0


def test_triton_forward_and_backward_over_several_programs_match_float64_twin(rng, triton_device):
    window = 5
    fixed, moving = pair(MULTI_BLOCK_SHAPE, rng, torch.float64)
    grad_out = torch.randn(1, generator=rng, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (fixed, moving)]
    expected = local_ncc(*ref, window, backend="torch")
    expected.backward(grad_out)
    inputs = [t.to(triton_device).requires_grad_() for t in (fixed, moving)]
    out = local_ncc(*inputs, window, backend="triton")
    err = max_rel(out, expected.detach())
    assert err < 1e-12, f"forward: max relative error {err:.2e}"
    out.backward(grad_out.to(triton_device))
    for name, x, r in zip(("fixed", "moving"), inputs, ref):
        err = grad_error(x.grad, r.grad)
        assert err < 1e-12, f"grad {name}: max error {err:.2e} of the largest"


def _volume(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "fixed,moving,window,backend,match",
    [
        (_volume(1, 6, 7, 8), _volume(1, 6, 7, 8), 3, "auto", "shape"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 9), 3, "auto", "spatial size"),
        (_volume(1, 1, 6, 7, 8), _volume(2, 1, 6, 7, 8), 3, "auto", "batch size"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 2, 6, 7, 8), 3, "auto", "channels"),
        (_volume(1, 1, 6, 7, 8, dtype=torch.int32), _volume(1, 1, 6, 7, 8), 3, "auto", "dtype"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 4, "auto", "odd"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 0, "auto", "odd"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 3.0, "auto", "odd"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 3, "cuda", "backend"),
    ],
    ids=[
        "rank4",
        "spatial-mismatch",
        "batch-mismatch",
        "channel-mismatch",
        "int-dtype",
        "even-window",
        "zero-window",
        "float-window",
        "bad-backend",
    ],
)
def test_rejects_bad_inputs_with_value_error(fixed, moving, window, backend, match):
    with pytest.raises(ValueError, match=match):
        local_ncc(fixed, moving, window, backend=backend)
