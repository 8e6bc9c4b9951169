"""lumireg.kernels.integrate: scaling and squaring against a plain float64 loop of the grid_sample oracle."""

import math

import pytest
import torch
import triton

from lumireg.kernels import _dispatch, integrate, warp
from lumireg.kernels._dispatch import LAUNCH
from lumireg.kernels.integrate import SquaringStep
from lumireg.kernels.warp import warp_forward

BACKENDS = ["triton", "torch"]


def _device(backend, triton_device):
    return triton_device if backend == "triton" else "cpu"


def _oracle_integrate(oracle, velocity, steps):
    u = velocity.double() / 2**steps
    for _ in range(steps):
        u = u + oracle.warp(u, u)
    return u


def _smooth_velocity(rng, batch, size, amplitude):
    """Products of half-period sines with random phases: smooth, max |v| <= amplitude voxels."""
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) * (math.pi / s) for s in size], indexing="ij")
    phases = 2 * math.pi * torch.rand(batch, 3, 3, generator=rng, dtype=torch.float64)
    v = torch.ones(batch, 3, *size, dtype=torch.float64)
    for axis in range(3):
        v = v * torch.sin(axes[axis] + phases[:, :, axis, None, None, None])
    return amplitude * v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,steps", [(1, 7), (2, 7), (2, 3)])
def test_integrate_matches_oracle_loop(rng, oracle, triton_device, backend, batch, steps):
    size = oracle.size(rng)
    velocity = 4.0 * torch.randn(batch, 3, *size, generator=rng, dtype=torch.float64)
    dev = _device(backend, triton_device)
    out = integrate(velocity.float().to(dev), steps=steps, backend=backend).cpu()
    assert out.dtype == torch.float32 and out.shape == velocity.shape
    err = oracle.rel_err(out, _oracle_integrate(oracle, velocity, steps))
    assert err < 1e-5, f"max relative error {err:.2e}"


def test_twin_gradient_passes_gradcheck(rng):
    velocity = (2.0 * torch.randn(1, 3, 4, 5, 6, generator=rng, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: integrate(v, steps=3, backend="torch"), (velocity,))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_triton_gradient_matches_twin(rng, oracle, triton_device, dtype, tol):
    velocity = 3.0 * torch.randn(2, 3, *oracle.size(rng), generator=rng, dtype=torch.float64)
    grad_out = torch.randn(velocity.shape, generator=rng, dtype=torch.float64)

    def grad(backend, device, dt):
        v = velocity.to(device, dt).requires_grad_()
        (g,) = torch.autograd.grad(integrate(v, backend=backend), v, grad_out.to(device, dt))
        return g.cpu()

    got, want = grad("triton", triton_device, dtype), grad("torch", "cpu", torch.float64)
    err = oracle.rel_err(got, want)
    if dtype == torch.float64:
        assert err < tol, f"max relative error {err:.2e}"
        return
    # In float32 a sample can round across a cell edge at one of the 7 steps, where trilinear's
    # gradient jumps (measured: 2 seeds in 40, 4 elements, 4e-3); a real defect moves far more.
    off = ((got.double() - want).abs() > tol * want.abs().max()).double().mean().item()
    assert off <= 2e-3 and err < 2e-2, f"{off:.2%} of elements off by > {tol:.0e} x max; max error {err:.2e}"


# LAUNCH[...].block = 1024 voxels per program along grid axis 0 (one sample per grid axis 1): 12 * 14 * 16 = 2688
# voxels are 3 programs per sample, the last one partial; each squaring step samples across programs.
MULTI_BLOCK_SIZE = (12, 14, 16)


def test_multi_block_size_spans_three_programs_the_last_partial():
    BLOCK = LAUNCH["integrate"].block

    n = MULTI_BLOCK_SIZE[0] * MULTI_BLOCK_SIZE[1] * MULTI_BLOCK_SIZE[2]
    assert triton.cdiv(n, BLOCK) == 3 and n % BLOCK != 0


def test_triton_forward_and_backward_over_several_programs_match_float64_twin(rng, oracle, triton_device):
    steps = 2  # the second squaring samples a field the first one wrote; each step is the same two launches
    velocity = 3.0 * torch.randn(1, 3, *MULTI_BLOCK_SIZE, generator=rng, dtype=torch.float64)
    grad_out = torch.randn(velocity.shape, generator=rng, dtype=torch.float64)

    def run(backend, device):
        v = velocity.to(device).requires_grad_()
        u = integrate(v, steps=steps, backend=backend)
        (g,) = torch.autograd.grad(u, v, grad_out.to(device))
        return u.detach().cpu(), g.cpu()

    for name, got, want in zip(("forward", "gradient"), run("triton", triton_device), run("torch", "cpu")):
        err = oracle.rel_err(got, want)
        assert err < 1e-10, f"{name}: max relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_velocity_inside_volume_is_that_translation(rng, oracle, triton_device, backend):
    size = (20, 21, 22)
    shift = torch.rand(3, generator=rng, dtype=torch.float64) * 1.6 - 0.8  # |shift| < 1 voxel
    velocity = shift.view(1, 3, 1, 1, 1).expand(1, 3, *size).float()
    dev = _device(backend, triton_device)
    u = integrate(velocity.to(dev), backend=backend).cpu()
    # zero padding at the edge reaches at most one voxel further inwards per squaring step
    interior = u[:, :, 8:-8, 8:-8, 8:-8]
    assert torch.allclose(interior, shift.float().view(1, 3, 1, 1, 1).expand_as(interior), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integrating_minus_velocity_inverts_the_transform(rng, triton_device, backend):
    size = (16, 18, 20)
    velocity = _smooth_velocity(rng, 2, size, amplitude=2.0).float()
    dev = _device(backend, triton_device)
    forward = integrate(velocity.to(dev), backend=backend)
    inverse = integrate(-velocity.to(dev), backend=backend)
    # x -> x + u_f(x) -> (x + u_f(x)) + u_i(x + u_f(x)): the composition's displacement
    composed = (forward + warp(inverse, forward, backend=backend)).cpu()
    naive = (forward + warp(-forward, forward, backend=backend)).cpu()  # -u_f is not the inverse
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    scale = forward.cpu()[interior].abs().max()
    residual, naive_residual = composed[interior].abs().max() / scale, naive[interior].abs().max() / scale
    assert residual < 0.03, f"|u_f + u_i o (id + u_f)| is {residual:.3f} of |u_f|"
    assert residual < 0.2 * naive_residual, f"{residual:.3f} vs {naive_residual:.3f} for -u_f"


def test_zero_steps_returns_the_velocity(rng):
    velocity = torch.randn(1, 3, 4, 5, 6, generator=rng)
    assert torch.equal(integrate(velocity, steps=0, backend="torch"), velocity)


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_bad_steps_raise_value_error(steps):
    with pytest.raises(ValueError, match="steps must be"):
        integrate(torch.zeros(1, 3, 4, 4, 4), steps=steps)


@pytest.mark.parametrize("shape", [(1, 2, 4, 4, 4), (3, 4, 4, 4)])
def test_velocity_of_wrong_shape_raises_value_error(shape):
    with pytest.raises(ValueError, match="velocity"):
        integrate(torch.zeros(shape))


def test_half_velocity_integrates_in_float32(rng, oracle, triton_device):
    velocity = 2.0 * torch.randn(1, 3, *oracle.size(rng), generator=rng, dtype=torch.float64)
    out = integrate(velocity.to(triton_device, torch.float16), backend="triton").cpu()
    assert out.dtype == torch.float32
    expected = _oracle_integrate(oracle, velocity.half().double(), 7)
    assert oracle.rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_scaled_first_squaring_matches_float64_oracle(rng, oracle, triton_device, dtype, tol):
    # the launch that folds the scaling in: s v + warp(s v, s v), s = 2**-steps
    scale = 2.0 ** -int(torch.randint(1, 8, (1,), generator=rng))
    velocity = 20.0 * torch.randn(2, 3, *oracle.size(rng), generator=rng, dtype=torch.float64)
    got = warp_forward(velocity.to(triton_device, dtype), velocity.to(triton_device, dtype), residual=True, scale=scale)
    u = scale * velocity.to(dtype).double()
    err = oracle.rel_err(got.cpu(), u + oracle.warp(u, u))
    assert err < tol, f"scale {scale}: max relative error {err:.2e}"


def test_scaled_squaring_step_gradient_passes_gradcheck_on_triton(rng, triton_device):
    velocity = (6.0 * torch.randn(1, 3, 3, 4, 5, generator=rng, dtype=torch.float64)).to(triton_device)
    assert torch.autograd.gradcheck(lambda v: SquaringStep.apply(v, 0.25), (velocity.requires_grad_(),))


@pytest.mark.parametrize("steps", [1, 7])
def test_integration_is_one_launch_per_step_forward_and_one_backward(rng, triton_device, steps):
    velocity = torch.randn(1, 3, 4, 5, 6, generator=rng).to(triton_device).requires_grad_()
    _dispatch.launches.clear()
    u = integrate(velocity, steps=steps, backend="triton")
    assert _dispatch.launches == {"_warp_forward_kernel": steps}
    _dispatch.launches.clear()
    u.sum().backward()
    assert _dispatch.launches == {"_warp_backward_kernel": steps}
