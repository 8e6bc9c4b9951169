"""mutual_information: the Triton kernels and the PyTorch twin against a loop oracle, gradients, properties."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton

from lumireg.kernels import mutual_information

mi_module = importlib.import_module("lumireg.kernels.mutual_information")  # the package attribute is the function


def parzen_weights_loop(x: float, bins: int, sigma: float) -> np.ndarray:
    """One voxel's weights over the bin centres, straight from the definition."""
    x = min(max(x, 0.0), 1.0)
    width = sigma / (bins - 1)
    e = np.array([math.exp(-((x - k / (bins - 1)) ** 2) / (2 * width * width)) for k in range(bins)])
    return e / e.sum()


def loop_mi(fixed: torch.Tensor, moving: torch.Tensor, bins: int, sigma: float) -> torch.Tensor:
    """Parzen-window MI in float64 with plain loops over samples, voxels and bins (tiny volumes only)."""
    out = []
    for f, m in zip(fixed.double().cpu().flatten(1).tolist(), moving.double().cpu().flatten(1).tolist()):
        joint = np.zeros((bins, bins))
        for x, y in zip(f, m):
            joint += np.outer(parzen_weights_loop(x, bins, sigma), parzen_weights_loop(y, bins, sigma))
        joint /= len(f)
        pf, pm = joint.sum(axis=1), joint.sum(axis=0)
        total = 0.0
        for i in range(bins):
            for j in range(bins):
                total += joint[i, j] * math.log((joint[i, j] + 1e-10) / (pf[i] * pm[j] + 1e-10))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def structured(shape, rng, dtype=torch.float64) -> torch.Tensor:
    """A smooth random field plus noise, in [0, 1]."""
    coarse = torch.rand(shape[0], 1, 3, 3, 3, generator=rng, dtype=torch.float64)
    smooth = F.interpolate(coarse, size=shape[2:], mode="trilinear", align_corners=True)
    return (0.7 * smooth + 0.3 * torch.rand(shape, generator=rng, dtype=torch.float64)).to(dtype)


def pair(shape, rng, dtype=torch.float64):
    """A fixed image and a moving image related to it (MI well above zero), a few voxels outside 0..1."""
    fixed = structured(shape, rng) * 1.1 - 0.05
    moving = 0.6 * structured(shape, rng) + 0.4 * (1 - fixed) ** 2
    fixed[..., 0, 0, 0], moving[..., 0, 0, 1] = -0.2, 1.3
    return fixed.to(dtype), moving.to(dtype)


def random_shape(rng, batch):
    """Around 8x10x12 in a random order: one even size, one odd, one anywhere in 4..13."""
    sizes = [
        2 * int(torch.randint(3, 7, (1,), generator=rng)),
        2 * int(torch.randint(3, 7, (1,), generator=rng)) + 1,
        int(torch.randint(4, 14, (1,), generator=rng)),
    ]
    order = torch.randperm(3, generator=rng).tolist()
    return (batch, 1, *(sizes[k] for k in order))


def random_batch(rng) -> int:
    return int(torch.randint(1, 4, (1,), generator=rng))


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected) / expected).abs().max().item()


def grad_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the largest gradient: per-voxel gradients cross zero."""
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max()).item()


def on(device, *tensors):
    return [t.to(device) for t in tensors]


# (bins, sigma): the default, coarse and wide, fine and narrow, the least bins, a non-power of two
CASES = [(32, 0.5), (8, 1.0), (40, 0.3), (2, 0.5), (13, 0.7)]


def float64_tolerance(bins: int) -> float:
    # two bins leave MI ~0.01 nats, a sum of terms ~0.3 that cancel: relative rounding grows ~30-fold
    return 1e-10 if bins == 2 else 1e-12


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_binary_image_with_itself_scores_log_two(triton_device, backend):
    # half the voxels at 0, half at 1, two bins, narrow windows (off-centre weight exp(-50)): the joint is
    # diag(1/2, 1/2), so MI = ln 2, or with the guards log((1/2 + 1e-10) / (1/4 + 1e-10)) = ln 2 - 2e-10
    image = torch.zeros(1, 1, 4, 4, 4, dtype=torch.float64)
    image[..., 2:] = 1
    expected = math.log((0.5 + 1e-10) / (0.25 + 1e-10))
    assert loop_mi(image, image, 2, 0.1).item() == pytest.approx(expected, abs=1e-15)
    device = triton_device if backend == "triton" else "cpu"
    out = mutual_information(*on(device, image, image), bins=2, sigma=0.1, backend=backend)
    assert out.item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("bins,sigma", CASES)
def test_torch_twin_float64_matches_loop_oracle(rng, bins, sigma):
    shape = random_shape(rng, random_batch(rng))
    fixed, moving = pair(shape, rng)
    out = mutual_information(fixed, moving, bins, sigma, backend="torch")
    assert out.shape == (shape[0],) and out.dtype == torch.float64
    err = max_rel(out, loop_mi(fixed, moving, bins, sigma))
    assert err < float64_tolerance(bins), f"shape {shape} bins {bins} sigma {sigma}: max relative error {err:.2e}"


@pytest.mark.parametrize("bins,sigma", CASES)
def test_triton_float64_matches_loop_oracle(rng, triton_device, bins, sigma):
    shape = random_shape(rng, random_batch(rng))
    fixed, moving = pair(shape, rng)
    out = mutual_information(*on(triton_device, fixed, moving), bins, sigma, backend="triton")
    assert out.shape == (shape[0],) and out.dtype == torch.float64
    err = max_rel(out, loop_mi(fixed, moving, bins, sigma))
    assert err < float64_tolerance(bins), f"shape {shape} bins {bins} sigma {sigma}: max relative error {err:.2e}"


# bins = 2 is left out in float32: its MI is ~0.01 nats, a difference of nearly equal logs
@pytest.mark.parametrize("bins,sigma", [c for c in CASES if c[0] > 2])
def test_triton_and_twin_float32_match_loop_oracle(rng, triton_device, bins, sigma):
    shape = random_shape(rng, random_batch(rng))
    fixed, moving = pair(shape, rng)
    expected = loop_mi(fixed, moving, bins, sigma)
    single = fixed.float(), moving.float()
    triton_out = mutual_information(*on(triton_device, *single), bins, sigma, backend="triton")
    twin_out = mutual_information(*single, bins, sigma, backend="torch")
    for name, out in (("triton", triton_out), ("twin", twin_out)):
        assert out.dtype == torch.float32
        err = max_rel(out, expected)
        assert err < 2e-5, f"{name} shape {shape} bins {bins}: max relative error {err:.2e}"
    err = max_rel(triton_out, twin_out.double())
    assert err < 2e-5, f"triton vs twin, shape {shape} bins {bins}: max relative error {err:.2e}"


def test_triton_result_is_deterministic(rng, triton_device):
    fixed, moving = on(triton_device, *pair(random_shape(rng, 2), rng, torch.float32))
    first = mutual_information(fixed, moving, backend="triton")
    assert torch.equal(first, mutual_information(fixed, moving, backend="triton"))


def test_auto_backend_on_cpu_tensors_runs_the_twin(rng, monkeypatch):
    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("the Triton kernels ran on CPU tensors under backend='auto'")

    monkeypatch.setattr(mi_module, "joint_histogram_forward", kernel_must_not_run)
    monkeypatch.setattr(mi_module, "joint_histogram_backward", kernel_must_not_run)
    fixed, moving = (t.requires_grad_() for t in pair((1, 1, 6, 7, 8), rng, torch.float32))
    out = mutual_information(fixed, moving)
    out.sum().backward()
    assert torch.equal(out, mutual_information(fixed, moving, backend="torch"))


def test_torch_twin_gradients_pass_gradcheck(rng):
    # intensities inside (0, 1): the clamp's kinks would break finite differences
    fixed, moving = (0.05 + 0.9 * t for t in pair((1, 1, 3, 3, 4), rng))
    fixed, moving = fixed.clamp(0.05, 0.95).requires_grad_(), moving.clamp(0.05, 0.95).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, m: mutual_information(f, m, 6, 0.7, backend="torch"), (fixed, moving))


def test_triton_gradients_pass_gradcheck(rng, triton_device):
    # fast mode (finite differences along random directions): the full Jacobian costs 14 s interpreted
    fixed, moving = (0.05 + 0.9 * t for t in pair((2, 1, 3, 3, 3), rng))
    fixed, moving = (t.clamp(0.05, 0.95).to(triton_device).requires_grad_() for t in (fixed, moving))
    assert torch.autograd.gradcheck(
        lambda f, m: mutual_information(f, m, 5, 0.6, backend="triton"), (fixed, moving), fast_mode=True
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("bins,sigma", [(32, 0.5), (13, 0.7)])
def test_triton_gradients_match_twin_for_both_inputs(rng, triton_device, dtype, tol, bins, sigma):
    shape = random_shape(rng, random_batch(rng))
    fixed, moving = pair(shape, rng, dtype)
    grad_out = torch.randn(shape[0], generator=rng, dtype=torch.float64)
    ref = [t.double().clone().requires_grad_() for t in (fixed, moving)]
    mutual_information(*ref, bins, sigma, backend="torch").backward(grad_out)
    inputs = [t.to(triton_device).clone().requires_grad_() for t in (fixed, moving)]
    mutual_information(*inputs, bins, sigma, backend="triton").backward(grad_out.to(dtype).to(triton_device))
    for name, x, r in zip(("fixed", "moving"), inputs, ref):
        assert x.grad.dtype == dtype
        err = grad_error(x.grad, r.grad)
        assert err < tol, f"{name} shape {shape}: max gradient error {err:.2e} of the largest"
        # the clamp passes no gradient outside 0..1
        outside = (r.detach() < 0) | (r.detach() > 1)
        assert outside.any() and (x.grad.cpu()[outside] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_reaches_only_the_input_that_requires_it(rng, triton_device, backend):
    device = triton_device if backend == "triton" else "cpu"
    fixed, moving = on(device, *pair((2, 1, 6, 7, 8), rng))
    moving.requires_grad_()
    mutual_information(fixed, moving, backend=backend).sum().backward()
    assert fixed.grad is None
    ref = [t.detach().cpu().clone().requires_grad_() for t in (fixed, moving)]
    mutual_information(*ref, backend="torch").sum().backward()
    assert grad_error(moving.grad, ref[1].grad) < 1e-11
    assert moving.grad.abs().max() > 0


def test_backward_takes_log_ratio_minus_one_and_ignores_a_constant(rng, triton_device):
    # dMI/dp_ij = log(p_ij / (pf_i pm_j)) - 1 without the 1e-10 guards; the guards are negligible when
    # every cell holds mass (few bins, wide windows: p >= 1e-3 here). A constant added to G changes
    # nothing, since each voxel's weights sum to 1, so the derivatives of its weights sum to 0.
    bins, sigma = 6, 3.0
    fixed, moving = pair((2, 1, 5, 6, 7), rng)
    ref = [t.clone().requires_grad_() for t in (fixed, moving)]
    mutual_information(*ref, bins, sigma, backend="torch").sum().backward()
    with torch.no_grad():
        wf, wm = (mi_module.parzen_weights_torch(t, bins, sigma, torch.float64) for t in (fixed, moving))
        joint = torch.bmm(wf.transpose(1, 2), wm) / wf.shape[1]
    assert joint.min() > 1e-3
    log_ratio = torch.log(joint / (joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)))
    for constant in (-1.0, 7.0):
        grads = mi_module.joint_histogram_backward(
            (log_ratio + constant).to(triton_device), *on(triton_device, fixed, moving), bins, sigma
        )
        for name, g, r in zip(("fixed", "moving"), grads, ref):
            err = grad_error(g, r.grad)
            assert err < 1e-6, f"G = log ratio {constant:+}: {name} gradient error {err:.2e} of the largest"


# BLOCK = 128 voxels for 32 bins; MAX_PARTIAL = 3 * 32 * 32 makes 3 programs per sample, each looping over
# 7 blocks of the 11 * 13 * 17 = 2431 voxels (19 blocks, the last partial, one program's last pass empty).
MULTI_PASS_SHAPE = (2, 1, 11, 13, 17)


def test_multi_pass_shape_makes_each_program_loop_with_a_partial_block():
    bins_p, block, _ = mi_module._launch_shape(32)
    n = MULTI_PASS_SHAPE[2] * MULTI_PASS_SHAPE[3] * MULTI_PASS_SHAPE[4]
    blocks = triton.cdiv(n, block)
    assert (bins_p, block) == (32, 128) and blocks == 19 and n % block != 0 and triton.cdiv(blocks, 3) == 7


def test_triton_forward_and_backward_with_looping_programs_match_float64_twin(rng, triton_device, monkeypatch):
    monkeypatch.setattr(mi_module, "MAX_PARTIAL", 3 * 32 * 32)
    fixed, moving = pair(MULTI_PASS_SHAPE, rng)
    grad_out = torch.randn(2, generator=rng, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (fixed, moving)]
    expected = mutual_information(*ref, backend="torch")
    expected.backward(grad_out)
    inputs = [t.to(triton_device).requires_grad_() for t in (fixed, moving)]
    out = mutual_information(*inputs, backend="triton")
    err = max_rel(out, expected.detach())
    assert err < 1e-12, f"forward: max relative error {err:.2e}"
    out.backward(grad_out.to(triton_device))
    for name, x, r in zip(("fixed", "moving"), inputs, ref):
        err = grad_error(x.grad, r.grad)
        assert err < 1e-11, f"grad {name}: max error {err:.2e} of the largest"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_accepts_half_inputs_and_computes_in_float32(rng, triton_device, dtype):
    half = [t.to(dtype) for t in pair((2, 1, 6, 7, 8), rng)]
    out = mutual_information(*on(triton_device, *half), backend="triton")
    assert out.dtype == torch.float32
    exact = mutual_information(*(t.double() for t in half), backend="torch")
    err = max_rel(out, exact)
    assert err < 2e-5, f"{dtype}: relative error {err:.2e} against float64 on the same half inputs"
    # beside a float64 input, the half one is computed in float64
    mixed = half[0].to(triton_device), half[1].double().to(triton_device)
    out = mutual_information(*mixed, backend="triton")
    assert out.dtype == torch.float64 and max_rel(out, exact) < 1e-12


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_narrow_windows_between_centres_do_not_underflow_in_float32(rng, triton_device, backend):
    # sigma = 0.02 bin spacings, intensities midway between centres: exp(-312) is 0 in float32, so
    # normalising exp / sum would give 0 / 0; the weights are a softmax, which keeps the nearest centre at 1.
    # Rounding a distance to float32 moves its logit by ~1e-5 here (the slope is 0.5 / sigma**2), hence 1e-3.
    bins, sigma = 8, 0.02
    levels = lambda: ((torch.randint(0, bins - 1, (2, 1, 4, 5, 6), generator=rng) + 0.5) / (bins - 1)).float()  # noqa: E731
    fixed, moving = levels(), levels()
    device = triton_device if backend == "triton" else "cpu"
    out = mutual_information(*on(device, fixed, moving), bins, sigma, backend=backend)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    err = max_rel(out, loop_mi(fixed, moving, bins, sigma))
    assert err < 1e-3, f"relative error {err:.2e}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_image_shares_more_information_with_itself_than_with_other_images(rng, triton_device, backend):
    # not a theorem for Parzen MI (a gentle monotonic remap of x can score slightly above x itself, the
    # bins filling differently), but it holds by a wide margin against images that carry less of x
    # (at most 0.46 of MI(x, x) measured over 40 draws)
    device = triton_device if backend == "triton" else "cpu"
    shape = (1, 1, 8, 10, 12)
    x = structured(shape, rng)
    others = {
        "noise": torch.rand(shape, generator=rng, dtype=torch.float64),
        "independent structure": structured(shape, rng),
        "partly x": 0.5 * x + 0.5 * structured(shape, rng),
        "x plus noise": 0.8 * x + 0.2 * torch.rand(shape, generator=rng, dtype=torch.float64),
    }
    itself = mutual_information(*on(device, x, x), backend=backend).item()
    for name, y in others.items():
        other = mutual_information(*on(device, x, y), backend=backend).item()
        assert other < 0.75 * itself, f"MI(x, {name}) = {other:.3f} vs MI(x, x) = {itself:.3f}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_monotonic_remap_changes_mi_little_and_a_folding_one_much_more(rng, triton_device, backend):
    # True MI of continuous variables is invariant under any one-to-one remapping; the Parzen estimate only
    # approximately, since the remap changes how the intensities fill the bins: at most 8 % measured for
    # sqrt over 80 such pairs, hence the 15 % tolerance. Folding (two-to-one, 1 - |2y - 1|) dropped 32 % or more.
    device = triton_device if backend == "triton" else "cpu"
    shape = (2, 1, 8, 10, 12)
    fixed = structured(shape, rng)
    fixed, moving = on(device, fixed, 0.6 * fixed + 0.4 * structured(shape, rng))
    before = mutual_information(fixed, moving, backend=backend)
    remapped = mutual_information(fixed, moving.sqrt(), backend=backend)
    folded = mutual_information(fixed, 1 - (2 * moving - 1).abs(), backend=backend)
    change = max_rel(remapped, before.double().cpu())
    assert change < 0.15, f"monotonic remap: relative change {change:.3f}"
    drop = ((before - folded) / before).min().item()
    assert drop > 0.2, f"folding remap: relative drop only {drop:.3f}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_permuting_bin_centred_levels_leaves_mi_unchanged_with_narrow_windows(rng, triton_device, backend):
    # Intensities at bin centres with sigma = 0.15 bin spacings: a neighbour's weight is exp(-22), so the
    # joint histogram is the discrete one and any one-to-one relabelling of the moving levels (here not
    # monotonic) only permutes its columns. Changes are ~1e-10 relative, from the exp(-22) tails.
    bins, sigma = 8, 0.15
    device = triton_device if backend == "triton" else "cpu"
    shape = (2, 1, 6, 7, 8)
    fixed_levels = torch.randint(0, bins, shape, generator=rng)
    related = torch.randperm(bins, generator=rng)[fixed_levels]
    unrelated = torch.randint(0, bins, shape, generator=rng)
    moving_levels = torch.where(torch.rand(shape, generator=rng) < 0.7, related, unrelated)
    relabel = torch.randperm(bins, generator=rng)
    while torch.equal(relabel, relabel.sort().values):
        relabel = torch.randperm(bins, generator=rng)
    fixed, moving, relabelled = (
        t.double().div(bins - 1) for t in (fixed_levels, moving_levels, relabel[moving_levels])
    )
    before = mutual_information(*on(device, fixed, moving), bins, sigma, backend=backend)
    after = mutual_information(*on(device, fixed, relabelled), bins, sigma, backend=backend)
    assert (before > 0.3).all()
    err = max_rel(after, before.double().cpu())
    assert err < 1e-8, f"relabelling {relabel.tolist()}: relative change {err:.2e}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_independent_noise_images_score_near_zero(rng, triton_device, backend):
    # Their true MI is 0, but any plug-in estimate is biased upwards: for a crisp histogram by about
    # (bins - 1)**2 / (2 N) nats (0.117 for 32 bins, N = 4096). The Parzen windows average each cell
    # of the joint histogram with its neighbours, about 4 pi sigma**2 cells' worth (pi at sigma = 0.5),
    # which divides that bias by as much: about 0.037 nats, against ~2.4 for an image with itself.
    # Measured over 20 pairs: 0.98-1.14 of the crisp prediction, 0.84-1.05 of the smoothed one.
    device = triton_device if backend == "triton" else "cpu"
    shape = (2, 1, 16, 16, 16)
    a, b = (torch.rand(shape, generator=rng, dtype=torch.float64) for _ in range(2))
    crisp_bias = 31**2 / (2 * 4096)
    smoothed = mutual_information(*on(device, a, b), backend=backend)
    crisp = mutual_information(*on(device, a, b), sigma=0.05, backend=backend)
    assert (0.7 * crisp_bias < crisp).all() and (crisp < 1.3 * crisp_bias).all(), crisp
    expected = crisp_bias / (4 * math.pi * 0.5**2)
    assert (0.7 * expected < smoothed).all() and (smoothed < 1.3 * expected).all(), smoothed


def test_symmetric_in_the_two_images(rng, triton_device):
    fixed, moving = on(triton_device, *pair((2, 1, 6, 7, 8), rng))
    forward = mutual_information(fixed, moving, backend="triton")
    assert max_rel(mutual_information(moving, fixed, backend="triton"), forward.double().cpu()) < 1e-12


def _volume(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "fixed,moving,bins,sigma,backend,match",
    [
        (_volume(1, 6, 7, 8), _volume(1, 6, 7, 8), 32, 0.5, "auto", "shape"),
        (_volume(1, 2, 6, 7, 8), _volume(1, 2, 6, 7, 8), 32, 0.5, "auto", "channels"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 9), 32, 0.5, "auto", "spatial size"),
        (_volume(1, 1, 6, 7, 8), _volume(2, 1, 6, 7, 8), 32, 0.5, "auto", "batch size"),
        (_volume(1, 1, 6, 7, 8, dtype=torch.int32), _volume(1, 1, 6, 7, 8), 32, 0.5, "auto", "dtype"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8, dtype=torch.uint8), 32, 0.5, "auto", "dtype"),
        (_volume(1, 1, 6, 7, 1), _volume(1, 1, 6, 7, 1), 32, 0.5, "auto", "spatial size"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 1, 0.5, "auto", "bins"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 32.0, 0.5, "auto", "bins"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), True, 0.5, "auto", "bins"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 32, 0.0, "auto", "sigma"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 32, -0.5, "auto", "sigma"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 32, float("nan"), "auto", "sigma"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 32, float("inf"), "auto", "sigma"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 32, "0.5", "auto", "sigma"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 32, 0.5, "cuda", "backend"),
        (_volume(1, 1, 6, 7, 8), _volume(1, 1, 6, 7, 8), 129, 0.5, "triton", "128"),
    ],
    ids=[
        "rank4",
        "two-channels",
        "spatial-mismatch",
        "batch-mismatch",
        "int-dtype",
        "uint8-moving",
        "size-1-axis",
        "one-bin",
        "float-bins",
        "bool-bins",
        "zero-sigma",
        "negative-sigma",
        "nan-sigma",
        "inf-sigma",
        "str-sigma",
        "bad-backend",
        "too-many-bins-for-triton",
    ],
)
def test_rejects_bad_inputs_with_value_error(triton_device, fixed, moving, bins, sigma, backend, match):
    device = triton_device if backend == "triton" else "cpu"
    with pytest.raises(ValueError, match=match):
        mutual_information(fixed.to(device), moving.to(device), bins, sigma, backend=backend)
