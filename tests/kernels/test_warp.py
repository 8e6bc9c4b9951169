"""lumireg.kernels.warp: Triton kernels and PyTorch twin against a float64 grid_sample oracle."""

import pytest
import torch
import triton

from lumireg.kernels import warp
from lumireg.kernels._dispatch import LAUNCH
from lumireg.kernels.warp import warp_torch

BACKENDS = ["triton", "torch"]


def _inputs(rng, batch, channels, size, dtype=torch.float32, scale=3.0):
    """A random image and a displacement of a few voxels: many samples fall outside the volume.

    Sample coordinates keep 0.02 voxel away from cell edges: trilinear's
    gradient jumps there, and float32 rounding could put a sample in the
    neighbouring cell from the float64 oracle's.
    """
    image = torch.randn(batch, channels, *size, generator=rng, dtype=torch.float64)
    disp = scale * torch.randn(batch, 3, *size, generator=rng, dtype=torch.float64)
    disp = disp.floor() + 0.02 + 0.96 * (disp - disp.floor())
    return image.to(dtype), disp.to(dtype)


def _device(backend, triton_device):
    return triton_device if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("batch,channels", [(1, 1), (2, 3)])
def test_trilinear_warp_matches_grid_sample_oracle(rng, oracle, triton_device, backend, padding, batch, channels):
    image, disp = _inputs(rng, batch, channels, oracle.size(rng))
    dev = _device(backend, triton_device)
    out = warp(image.to(dev), disp.to(dev), padding=padding, backend=backend).cpu()
    expected = oracle.warp(image, disp, padding=padding)
    assert out.dtype == torch.float32 and out.shape == image.shape
    err = oracle.rel_err(out, expected)
    assert err < 1e-5, f"max relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_nearest_warp_of_labels_matches_oracle_exactly(rng, oracle, triton_device, backend, padding):
    size = oracle.size(rng)
    labels = torch.randint(0, 36, (2, 1, *size), generator=rng, dtype=torch.int32)
    _, disp = _inputs(rng, 2, 1, size)
    dev = _device(backend, triton_device)
    out = warp(labels.to(dev), disp.to(dev), mode="nearest", padding=padding, backend=backend).cpu()
    expected = oracle.warp(labels, disp, mode="nearest", padding=padding)
    assert out.dtype == torch.int32
    assert torch.equal(out, expected.to(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_warp_carries_no_gradient(rng, oracle, triton_device, backend):
    image, disp = _inputs(rng, 1, 1, oracle.size(rng))
    dev = _device(backend, triton_device)
    out = warp(image.to(dev).requires_grad_(), disp.to(dev).requires_grad_(), mode="nearest", backend=backend)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_zero_displacement_is_identity(rng, oracle, triton_device, backend, padding):
    image, _ = _inputs(rng, 2, 3, oracle.size(rng))
    dev = _device(backend, triton_device)
    out = warp(image.to(dev), torch.zeros(2, 3, *image.shape[2:], device=dev), padding=padding, backend=backend)
    if backend == "triton":
        assert torch.equal(out.cpu(), image), "the kernel samples voxel centres exactly"
    else:  # grid_sample normalises coordinates to [-1, 1] and back in float32
        assert oracle.rel_err(out.cpu(), image) < 1e-5


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_twin_gradients_pass_gradcheck(rng, padding):
    image = torch.randn(1, 2, 4, 5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    disp = (1.5 * torch.randn(1, 3, 4, 5, 6, generator=rng, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, d: warp_torch(i, d, padding=padding), (image, disp))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_triton_gradients_match_twin(rng, oracle, triton_device, dtype, tol, padding):
    image, disp = _inputs(rng, 2, 3, oracle.size(rng), dtype=torch.float64)
    grad_out = torch.randn(image.shape, generator=rng, dtype=torch.float64)

    def grads(backend, device, dt):
        i = image.to(device, dt).requires_grad_()
        d = disp.to(device, dt).requires_grad_()
        out = warp(i, d, padding=padding, backend=backend)
        return [g.cpu() for g in torch.autograd.grad(out, (i, d), grad_out.to(device, dt))]

    expected = grads("torch", "cpu", torch.float64)
    for name, got, want in zip(("image", "disp"), grads("triton", triton_device, dtype), expected):
        assert got.dtype == dtype
        err = oracle.rel_err(got, want)
        assert err < tol, f"grad {name}: max relative error {err:.2e}"


def test_triton_gradient_to_disp_alone(rng, oracle, triton_device):
    image, disp = _inputs(rng, 1, 1, oracle.size(rng))
    d_triton = disp.to(triton_device, copy=True).requires_grad_()
    warp(image.to(triton_device), d_triton, backend="triton").square().sum().backward()
    d_twin = disp.detach().clone().requires_grad_()
    warp(image, d_twin, backend="torch").square().sum().backward()
    assert oracle.rel_err(d_triton.grad.cpu(), d_twin.grad) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_image_is_accepted_and_accurate(rng, oracle, triton_device, dtype):
    image, disp = _inputs(rng, 1, 2, oracle.size(rng))
    half = image.to(dtype)
    out = warp(half.to(triton_device), disp.to(triton_device), backend="triton").cpu()
    assert out.dtype == dtype
    # accumulated in float32, so the only error left is one rounding of each result to dtype: eps / 2
    # of it rounded to nearest, eps where Triton's interpreter truncates float32 to bfloat16; float32's
    # own share is a few 2**-24 of the largest value. The oracle samples the same rounded image in float64.
    truncated = dtype == torch.bfloat16 and triton_device == "cpu"
    tol = torch.finfo(dtype).eps * (1 if truncated else 0.5)
    expected = oracle.warp(half, disp)
    err = (out.double() - expected).abs()
    bound = tol * expected.abs() + 2**-18 * expected.abs().max()
    worst = (err / bound).max().item()
    assert worst <= 1, f"{dtype}: an element is off by {worst:.2f} x (eps {tol:.1e} of it + float32 slack)"


# LAUNCH[...].block = 1024 voxels per program along grid axis 0 (one sample per grid axis 1): 12 * 14 * 16 = 2688
# voxels are 3 programs, the last one partial; displacements of a few voxels sample across programs.
MULTI_BLOCK_SIZE = (12, 14, 16)


def test_multi_block_size_spans_three_programs_the_last_partial():
    BLOCK = LAUNCH["warp"].block

    n = MULTI_BLOCK_SIZE[0] * MULTI_BLOCK_SIZE[1] * MULTI_BLOCK_SIZE[2]
    assert triton.cdiv(n, BLOCK) == 3 and n % BLOCK != 0


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_triton_forward_and_backward_over_several_programs_match_float64_twin(rng, oracle, triton_device, padding):
    image, disp = _inputs(rng, 1, 2, MULTI_BLOCK_SIZE, dtype=torch.float64)
    grad_out = torch.randn(image.shape, generator=rng, dtype=torch.float64)

    def run(backend, device):
        i, d = image.to(device).requires_grad_(), disp.to(device).requires_grad_()
        out = warp(i, d, padding=padding, backend=backend)
        grads = torch.autograd.grad(out, (i, d), grad_out.to(device))
        return [t.cpu() for t in (out, *grads)]

    names = ("forward", "grad image", "grad disp")
    for name, got, want in zip(names, run("triton", triton_device), run("torch", "cpu")):
        err = oracle.rel_err(got, want)
        assert err < 1e-12, f"{name}: max relative error {err:.2e}"
    labels = torch.randint(0, 36, (1, 1, *MULTI_BLOCK_SIZE), generator=rng, dtype=torch.int32)
    nearest = warp(labels.to(triton_device), disp.to(triton_device), mode="nearest", padding=padding, backend="triton")
    assert torch.equal(nearest.cpu(), warp(labels, disp, mode="nearest", padding=padding, backend="torch"))


@pytest.mark.parametrize(
    "image_shape,disp_shape,kwargs,message",
    [
        ((1, 8, 9, 10), (1, 3, 8, 9, 10), {}, "image must have shape"),
        ((1, 1, 8, 9, 10), (1, 2, 8, 9, 10), {}, "disp must have 3 channels"),
        ((1, 1, 8, 9, 10), (1, 3, 8, 9, 11), {}, "must share batch size and spatial size"),
        ((2, 1, 8, 9, 10), (1, 3, 8, 9, 10), {}, "must share batch size"),
        ((1, 1, 1, 9, 10), (1, 3, 1, 9, 10), {}, "spatial size >= 2"),
        ((1, 1, 8, 9, 10), (1, 3, 8, 9, 10), {"mode": "bicubic"}, "mode must be one of"),
        ((1, 1, 8, 9, 10), (1, 3, 8, 9, 10), {"padding": "reflection"}, "padding must be one of"),
        ((1, 1, 8, 9, 10), (1, 3, 8, 9, 10), {"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_input_raises_clear_value_error(image_shape, disp_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        warp(torch.zeros(image_shape), torch.zeros(disp_shape), **kwargs)


def test_integer_image_is_refused_for_trilinear():
    with pytest.raises(ValueError, match="floating dtype"):
        warp(torch.zeros(1, 1, 4, 4, 4, dtype=torch.int32), torch.zeros(1, 3, 4, 4, 4))


def test_forced_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), backend="triton")


def test_auto_backend_runs_the_twin_on_cpu_tensors(monkeypatch):
    import importlib

    warp_module = importlib.import_module("lumireg.kernels.warp")  # the attribute is the function

    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("the Triton kernel ran on CPU tensors under backend='auto'")

    monkeypatch.setattr(warp_module, "warp_forward", kernel_must_not_run)
    out = warp(torch.ones(1, 1, 4, 5, 6), torch.zeros(1, 3, 4, 5, 6))
    assert torch.allclose(out, torch.ones(1, 1, 4, 5, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_warp_keeps_large_label_values_exact(rng, oracle, triton_device, backend):
    size = oracle.size(rng)
    labels = torch.randint(0, 8, (1, 1, *size), generator=rng, dtype=torch.int64) + 2**24 - 3
    _, disp = _inputs(rng, 1, 1, size)
    dev = _device(backend, triton_device)
    out = warp(labels.to(dev), disp.to(dev), mode="nearest", padding="border", backend=backend).cpu()
    expected = oracle.warp(labels, disp, mode="nearest", padding="border")
    assert torch.equal(out, expected.to(torch.int64))
