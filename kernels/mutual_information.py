"""Parzen-window mutual information of two images, for cross-contrast registration.

Each voxel's intensity ``x`` (clamped to 0..1) spreads over ``bins`` centres
``c_k = k / (bins - 1)`` with Gaussian weights ``w_k(x) ∝ exp(-(x - c_k)**2 / (2 s**2))``,
``s = sigma / (bins - 1)``, normalised per voxel (computed as a softmax, so a small
``sigma`` cannot underflow to 0 / 0). The joint histogram is the voxel mean of
``w(fixed) w(moving)^T``; with marginals ``pf``, ``pm``,
``MI = sum_ij p_ij log((p_ij + 1e-10) / (pf_i pm_j + 1e-10))``, in nats.

The Triton path forms the joint histogram: each program accumulates
``w_f^T @ w_m`` over its voxel blocks in registers and writes one
``bins x bins`` partial; a fixed-shape torch sum adds the partials (no atomics,
so the result is deterministic), and the small finish (marginals, log) is torch,
which autograd differentiates into ``G = dMI/dp`` (``log(p / (pf pm)) - 1`` up
to the guards; a constant in ``G`` drops out since every voxel's weights sum to 1).
The backward recomputes the weights per voxel: ``dMI/dx = sum_i dw_i/dx (G w_m)_i / N``
for the fixed image and ``sum_j dw_j/dy (G^T w_f)_j / N`` for the moving one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lumireg.kernels._dispatch import (
    LAUNCH,
    check_same_grid,
    check_volume,
    compute_dtype,
    launch,
    new_output,
    triton_dtype,
    use_triton,
)

EPS = 1e-10
MAX_TRITON_BINS = 128  # the Triton path holds a bins x bins accumulator per program in registers
MAX_PARTIAL = 2**20  # histogram partials per sample, elements: bounds the programs per sample


@triton.jit
def _parzen_weights(ptr, offs, mask, bins, sigma, ACC: tl.constexpr, BINS_P: tl.constexpr):
    """Per-voxel weights ``(BLOCK, BINS_P)`` (zero on padded bins and masked voxels), the distances to
    the centres in bin spacings, and whether the voxel lies inside 0..1 (the clamp passes a gradient)."""
    x = tl.load(ptr + offs, mask=mask, other=0).to(ACC)
    inside = (x >= 0) & (x <= 1)
    x = tl.minimum(tl.maximum(x, 0.0), 1.0)
    k = tl.arange(0, BINS_P)
    d = (x * (bins - 1))[:, None] - k[None, :].to(ACC)
    z = d / sigma
    logit = tl.where(k[None, :] < bins, -0.5 * z * z, float("-inf"))
    e = tl.exp(logit - tl.max(logit, axis=1)[:, None])
    w = e / tl.sum(e, axis=1)[:, None]
    return tl.where(mask[:, None], w, 0.0), d, inside


@triton.jit
def _mi_joint_kernel(
    fixed_ptr,
    moving_ptr,
    sigma_ptr,
    partial_ptr,
    n,
    bins,
    iters,
    BINS_P: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    plane = tl.program_id(1).to(tl.int64)
    sigma = tl.load(sigma_ptr)
    acc = tl.zeros([BINS_P, BINS_P], ACC)
    for it in range(iters):
        offs = (it * programs + pid) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        wf, _, _ = _parzen_weights(fixed_ptr + plane * n, offs, mask, bins, sigma, ACC, BINS_P)
        wm, _, _ = _parzen_weights(moving_ptr + plane * n, offs, mask, bins, sigma, ACC, BINS_P)
        # ieee: tf32 would round the weights to 10 bits
        acc = tl.dot(tl.trans(wf), wm, acc, input_precision="ieee", out_dtype=ACC)
    rows = tl.arange(0, BINS_P)
    out = partial_ptr + (plane * programs + pid) * BINS_P * BINS_P
    tl.store(out + rows[:, None] * BINS_P + rows[None, :], acc)


@triton.jit
def _weights_vjp(w, d, inside, v, bins, sigma):
    """``sum_k dw_k/dx v_k`` per voxel: the softmax's Jacobian, ``dlogit_k/dx = -(bins - 1) d_k / sigma**2``."""
    wd = tl.sum(w * d, axis=1)
    wv = tl.sum(w * v, axis=1)
    cov = tl.sum(w * d * v, axis=1) - wd * wv
    return tl.where(inside, -(bins - 1) / (sigma * sigma) * cov, 0.0)


@triton.jit
def _mi_backward_kernel(
    fixed_ptr,
    moving_ptr,
    sigma_ptr,
    coef_ptr,
    grad_fixed_ptr,
    grad_moving_ptr,
    n,
    bins,
    BINS_P: tl.constexpr,
    FIXED_GRAD: tl.constexpr,
    MOVING_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    plane = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sigma = tl.load(sigma_ptr)
    rows = tl.arange(0, BINS_P)
    # coef = dloss/dp / N, zero on padded bins
    coef = tl.load(coef_ptr + plane * BINS_P * BINS_P + rows[:, None] * BINS_P + rows[None, :]).to(ACC)
    wf, df, inside_f = _parzen_weights(fixed_ptr + plane * n, offs, mask, bins, sigma, ACC, BINS_P)
    wm, dm, inside_m = _parzen_weights(moving_ptr + plane * n, offs, mask, bins, sigma, ACC, BINS_P)
    if FIXED_GRAD:
        via_moving = tl.dot(wm, tl.trans(coef), input_precision="ieee", out_dtype=ACC)  # (G w_m)_i per voxel
        tl.store(grad_fixed_ptr + plane * n + offs, _weights_vjp(wf, df, inside_f, via_moving, bins, sigma), mask=mask)
    if MOVING_GRAD:
        via_fixed = tl.dot(wf, coef, input_precision="ieee", out_dtype=ACC)  # (G^T w_f)_j per voxel
        tl.store(grad_moving_ptr + plane * n + offs, _weights_vjp(wm, dm, inside_m, via_fixed, bins, sigma), mask=mask)


def _launch_shape(bins: int) -> tuple[int, int, int]:
    """``(BINS_P, BLOCK, num_warps)``: bins padded to a power of two >= 16 (tl.dot's least), voxels per block.

    Up to 32 bins, ``LAUNCH["mutual_information"]``; beyond, ``BLOCK x BINS_P`` stays at 2048 weights per
    program, 8 warps. For sm_90, ptxas compiles the 16- and 32-bin kernels without spills (or a few bytes);
    64 and 128 bins spill some. Not yet timed on a GPU.
    """
    bins_p = max(16, triton.next_power_of_2(bins))
    return (bins_p, *LAUNCH["mutual_information"]) if bins_p <= 32 else (bins_p, 2048 // bins_p, 8)


def _sigma_tensor(sigma: float, like: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # through memory: a Python float argument would reach the kernel rounded to float32
    return torch.tensor([sigma], dtype=acc, device=like.device)


def _kernel_inputs(fixed: torch.Tensor, moving: torch.Tensor):
    """Contiguous inputs as the kernels take them, and the compute dtype."""
    acc = compute_dtype(fixed, moving)
    if acc == torch.float64:
        # a half input beside a float64 one: Triton's fp64 MMA rejects operands computed from 16-bit loads
        fixed, moving = fixed.to(acc), moving.to(acc)
    return fixed.contiguous(), moving.contiguous(), acc


def joint_histogram_forward(fixed: torch.Tensor, moving: torch.Tensor, bins: int, sigma: float) -> torch.Tensor:
    """Launch the histogram kernel; returns the ``(B, bins, bins)`` joint histogram in the compute dtype."""
    fixed, moving, acc = _kernel_inputs(fixed, moving)
    B, n = fixed.shape[0], fixed[0].numel()
    bins_p, block, warps = _launch_shape(bins)
    programs = max(1, min(triton.cdiv(n, block), MAX_PARTIAL // (bins_p * bins_p)))
    iters = triton.cdiv(triton.cdiv(n, block), programs)
    partial = new_output((B, programs, bins_p, bins_p), fixed, dtype=acc)
    launch(
        _mi_joint_kernel,
        (programs, B),
        fixed,
        moving,
        _sigma_tensor(sigma, fixed, acc),
        partial,
        n,
        bins,
        iters,
        BINS_P=bins_p,
        ACC=triton_dtype(acc),
        BLOCK=block,
        num_warps=warps,
    )
    # a fixed-shape torch sum instead of atomics keeps the result deterministic
    return (partial.sum(dim=1)[:, :bins, :bins] / n).contiguous()


def joint_histogram_backward(
    grad_joint: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    bins: int,
    sigma: float,
    needs: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel for ``grad_joint`` ``(B, bins, bins)``; returns ``(grad_fixed, grad_moving)``
    in the inputs' dtypes, ``None`` where ``needs`` says no. The weights are recomputed, not saved."""
    dtypes = fixed.dtype, moving.dtype
    fixed, moving, acc = _kernel_inputs(fixed, moving)
    B, n = fixed.shape[0], fixed[0].numel()
    bins_p, block, warps = _launch_shape(bins)
    coef = torch.zeros((B, bins_p, bins_p), dtype=acc, device=fixed.device)
    coef[:, :bins, :bins] = grad_joint.to(acc) / n
    grads = [new_output(t.shape, t, dtype=acc) if need else None for t, need in zip((fixed, moving), needs)]
    launch(
        _mi_backward_kernel,
        (triton.cdiv(n, block), B),
        fixed,
        moving,
        _sigma_tensor(sigma, fixed, acc),
        coef,
        grads[0] if needs[0] else coef,  # never written when its flag is off
        grads[1] if needs[1] else coef,
        n,
        bins,
        BINS_P=bins_p,
        FIXED_GRAD=needs[0],
        MOVING_GRAD=needs[1],
        ACC=triton_dtype(acc),
        BLOCK=block,
        num_warps=warps,
    )
    return tuple(g.to(dtype) if g is not None else None for g, dtype in zip(grads, dtypes))


class JointHistogramFunction(torch.autograd.Function):
    """The Parzen joint histogram on the Triton kernels; saves only the inputs and recomputes the weights."""

    @staticmethod
    def forward(ctx, fixed: torch.Tensor, moving: torch.Tensor, bins: int, sigma: float) -> torch.Tensor:
        ctx.save_for_backward(fixed, moving)
        ctx.bins, ctx.sigma = bins, sigma
        return joint_histogram_forward(fixed, moving, bins, sigma)

    @staticmethod
    def backward(ctx, grad_joint: torch.Tensor):
        fixed, moving = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_fixed, grad_moving = joint_histogram_backward(grad_joint, fixed, moving, ctx.bins, ctx.sigma, needs)
        return grad_fixed, grad_moving, None, None


def mi_from_joint(joint: torch.Tensor) -> torch.Tensor:
    """``(B, bins, bins)`` joint histogram -> ``(B,)`` mutual information in nats, with the 1e-10 guards."""
    pf, pm = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    return (joint * torch.log((joint + EPS) / (pf * pm + EPS))).sum((1, 2))


def parzen_weights_torch(image: torch.Tensor, bins: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, D, H, W)`` -> ``(B, N, bins)`` per-voxel Parzen weights in ``dtype``, each row summing to 1."""
    centres = torch.linspace(0.0, 1.0, bins, device=image.device, dtype=dtype)
    spread = 2.0 * (sigma / (bins - 1)) ** 2
    x = image.to(dtype).flatten(1).clamp(0.0, 1.0).unsqueeze(-1)
    return torch.softmax(-((x - centres) ** 2) / spread, dim=-1)


def mutual_information_torch(fixed: torch.Tensor, moving: torch.Tensor, bins: int = 32, sigma: float = 0.5):
    """The PyTorch twin of :func:`mutual_information`: dense ``(B, N, bins)`` weights and one ``bmm``.

    Autograd gives the backward; memory grows as ``N * bins`` per image.
    """
    acc = compute_dtype(fixed, moving)
    wf, wm = parzen_weights_torch(fixed, bins, sigma, acc), parzen_weights_torch(moving, bins, sigma, acc)
    joint = torch.bmm(wf.transpose(1, 2), wm) / wf.shape[1]  # (B, bins, bins)
    return mi_from_joint(joint)


def mutual_information(
    fixed: torch.Tensor, moving: torch.Tensor, bins: int = 32, sigma: float = 0.5, backend: str = "auto"
) -> torch.Tensor:
    """Parzen-window mutual information of two images, per sample, in nats.

    Intensities are clamped to 0..1 (no gradient outside). Each voxel spreads
    over ``bins`` equally spaced bin centres ``k / (bins - 1)`` with Gaussian
    weights of standard deviation ``sigma`` bin spacings, normalised per voxel;
    the joint histogram is the mean over voxels of the outer product of the two
    images' weights, and ``MI = sum p log((p + 1e-10) / (pf pm + 1e-10))``.
    Symmetric in the two images. The training loss is ``-mutual_information``.

    Args:
        fixed: ``(B, 1, D, H, W)`` floating volume (float16, bfloat16, float32 or float64), intensities in 0..1.
        moving: ``(B, 1, D, H, W)`` floating volume on the same grid and device.
        bins: number of bin centres per image, an int >= 2 (the Triton path takes at most
            :data:`MAX_TRITON_BINS`; ``"auto"`` runs the twin beyond that).
        sigma: Gaussian width in bin spacings, > 0.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``lumireg.kernels``).

    Returns:
        ``(B,)`` in nats, >= 0 up to rounding, float32 (float64 if either input is float64;
        half inputs are computed in float32), differentiable in both inputs.
    """
    check_volume("fixed", fixed, channels=1)
    check_volume("moving", moving, channels=1)
    check_same_grid("fixed", fixed, "moving", moving)
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma < float("inf"):
        raise ValueError(f"sigma must be a finite number > 0 (bin spacings), got {sigma!r}")
    sigma = float(sigma)
    if use_triton(backend, fixed):
        if bins <= MAX_TRITON_BINS:
            return mi_from_joint(JointHistogramFunction.apply(fixed, moving, bins, sigma))
        if backend == "triton":
            raise ValueError(
                f"bins must be <= {MAX_TRITON_BINS} for the Triton kernels, got {bins}; backend='torch' takes any"
            )
    return mutual_information_torch(fixed, moving, bins, sigma)
