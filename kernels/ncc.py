"""Local normalised cross-correlation, VoxelMorph's NCC loss without its minus sign.

With box sums ``S_*`` over a ``window**3`` cube (zero padding ``window // 2``)
and ``n = window**3``: ``cross = S_IJ - S_I S_J / n``, ``var_I = S_II - S_I**2 / n``
(VoxelMorph's expanded ``u_I``/``u_J`` form reduces to these), and
``cc = cross**2 / (var_I var_J + 1e-5)``, averaged over channels and voxels.

The Triton path forms all five box sums in one separable sweep per axis
(W, then H, then D); the D pass computes ``cc`` in registers and reduces it
per program, so the final sums never reach memory. The box filter is
self-adjoint, so the backward filters five per-voxel coefficients
``dcc/dS_*`` with the same sweeps and combines them with ``I`` and ``J``;
the forward's D pass writes those coefficients when a gradient will be
needed, so the backward does not sweep the sums again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lumireg.contract import NCC_WINDOW
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

EPS = 1e-5
FIELDS = 5  # S_I, S_J, S_II, S_JJ, S_IJ (forward) or a_I, a_J, b_I, b_J, c (backward)


@triton.jit
def _box_sum(ptr, offs, stride, size, mask, WINDOW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of ``ptr`` over the window along the axis of ``stride`` and ``size``, zeros outside."""
    index = (offs // stride) % size
    acc = tl.zeros([BLOCK], ACC)
    for k in tl.static_range(WINDOW):
        shift = k - WINDOW // 2
        valid = mask & (index + shift >= 0) & (index + shift < size)
        acc += tl.load(ptr + offs + shift * stride, mask=valid, other=0).to(ACC)
    return acc


@triton.jit
def _ncc_terms(s_i, s_j, s_ii, s_jj, s_ij, WINDOW: tl.constexpr):
    # divide by the int n: a float 1/n constant would be rounded to float32 even in float64 runs
    n: tl.constexpr = WINDOW * WINDOW * WINDOW
    cross = s_ij - s_i * s_j / n
    var_i = s_ii - s_i * s_i / n
    var_j = s_jj - s_j * s_j / n
    return cross, var_i, var_j, var_i * var_j + 1e-5


@triton.jit
def _ncc_products_w_kernel(
    fixed_ptr, moving_ptr, out_ptr, n, W, WINDOW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    plane = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = offs % W
    s_i = tl.zeros([BLOCK], ACC)
    s_j = tl.zeros([BLOCK], ACC)
    s_ii = tl.zeros([BLOCK], ACC)
    s_jj = tl.zeros([BLOCK], ACC)
    s_ij = tl.zeros([BLOCK], ACC)
    for k in tl.static_range(WINDOW):
        shift = k - WINDOW // 2
        valid = mask & (w + shift >= 0) & (w + shift < W)
        i = tl.load(fixed_ptr + plane * n + offs + shift, mask=valid, other=0).to(ACC)
        j = tl.load(moving_ptr + plane * n + offs + shift, mask=valid, other=0).to(ACC)
        s_i += i
        s_j += j
        s_ii += i * i
        s_jj += j * j
        s_ij += i * j
    out = out_ptr + plane * 5 * n + offs
    tl.store(out, s_i, mask=mask)
    tl.store(out + n, s_j, mask=mask)
    tl.store(out + 2 * n, s_ii, mask=mask)
    tl.store(out + 3 * n, s_jj, mask=mask)
    tl.store(out + 4 * n, s_ij, mask=mask)


@triton.jit
def _ncc_box_kernel(
    src_ptr,
    dst_ptr,
    n,
    stride,
    size,
    FIELDS: tl.constexpr,
    WINDOW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    plane = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    for f in tl.static_range(FIELDS):
        base = (plane * FIELDS + f) * n
        tl.store(
            dst_ptr + base + offs, _box_sum(src_ptr + base, offs, stride, size, mask, WINDOW, ACC, BLOCK), mask=mask
        )


@triton.jit
def _ncc_terms_along_d(
    sums_ptr, plane, offs, n, HW, D, mask, WINDOW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """The last (D) sweep of the five box sums, then the NCC terms: ``s_i, s_j, cross, var_i, var_j, den``."""
    base = sums_ptr + plane * 5 * n
    s_i = _box_sum(base, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    s_j = _box_sum(base + n, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    s_ii = _box_sum(base + 2 * n, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    s_jj = _box_sum(base + 3 * n, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    s_ij = _box_sum(base + 4 * n, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    cross, var_i, var_j, den = _ncc_terms(s_i, s_j, s_ii, s_jj, s_ij, WINDOW)
    return s_i, s_j, cross, var_i, var_j, den


@triton.jit
def _ncc_forward_kernel(
    sums_ptr,
    partial_ptr,
    coef_ptr,
    n,
    HW,
    D,
    WINDOW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    COEFFICIENTS: tl.constexpr,
):
    """The D sweep: each program's sum of ``cc``; with ``COEFFICIENTS`` also the backward's per-voxel coefficients
    ``a_I, a_J, b_I, b_J, c`` (``dcc/dS_*``), so the backward never sweeps the sums again."""
    plane = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s_i, s_j, cross, var_i, var_j, den = _ncc_terms_along_d(sums_ptr, plane, offs, n, HW, D, mask, WINDOW, ACC, BLOCK)
    cc = tl.where(mask, cross * cross / den, 0.0)
    tl.store(partial_ptr + plane * tl.num_programs(0) + tl.program_id(0), tl.sum(cc, axis=0))
    if COEFFICIENTS:
        c = 2.0 * cross / den
        ratio = cross * cross / (den * den)
        b_i = -ratio * var_j
        b_j = -ratio * var_i
        out = coef_ptr + plane * 5 * n + offs
        tl.store(out, -(c * s_j + 2.0 * b_i * s_i) / (WINDOW * WINDOW * WINDOW), mask=mask)
        tl.store(out + n, -(c * s_i + 2.0 * b_j * s_j) / (WINDOW * WINDOW * WINDOW), mask=mask)
        tl.store(out + 2 * n, b_i, mask=mask)
        tl.store(out + 3 * n, b_j, mask=mask)
        tl.store(out + 4 * n, c, mask=mask)


@triton.jit
def _ncc_backward_kernel(
    coef_ptr,
    fixed_ptr,
    moving_ptr,
    scale_ptr,
    grad_fixed_ptr,
    grad_moving_ptr,
    C,
    n,
    HW,
    D,
    WINDOW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    plane = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = coef_ptr + plane * 5 * n
    a_i = _box_sum(base, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    a_j = _box_sum(base + n, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    b_i = _box_sum(base + 2 * n, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    b_j = _box_sum(base + 3 * n, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    c = _box_sum(base + 4 * n, offs, HW, D, mask, WINDOW, ACC, BLOCK)
    i = tl.load(fixed_ptr + plane * n + offs, mask=mask, other=0).to(ACC)
    j = tl.load(moving_ptr + plane * n + offs, mask=mask, other=0).to(ACC)
    scale = tl.load(scale_ptr + plane // C)
    tl.store(grad_fixed_ptr + plane * n + offs, scale * (a_i + 2.0 * i * b_i + j * c), mask=mask)
    tl.store(grad_moving_ptr + plane * n + offs, scale * (a_j + 2.0 * j * b_j + i * c), mask=mask)


def _launch(kernel, grid, *args, **meta) -> None:
    block, warps = LAUNCH["local_ncc"]
    launch(kernel, grid, *args, **meta, BLOCK=block, num_warps=warps)


def ncc_forward(
    fixed: torch.Tensor, moving: torch.Tensor, window: int, coefficients: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward sweeps (W, H, then D). Returns the ``(B,)`` mean local NCC in the compute dtype and,
    with ``coefficients``, the ``(B*C, 5, D*H*W)`` per-voxel coefficients :func:`ncc_backward` takes (else None)."""
    fixed, moving = fixed.contiguous(), moving.contiguous()
    B, C, D, H, W = fixed.shape
    n, acc = D * H * W, compute_dtype(fixed, moving)
    ACC = triton_dtype(acc)
    grid = (triton.cdiv(n, LAUNCH["local_ncc"].block), B * C)
    along_w = new_output((B * C, FIELDS, n), fixed, dtype=acc)
    _launch(_ncc_products_w_kernel, grid, fixed, moving, along_w, n, W, WINDOW=window, ACC=ACC)
    along_wh = new_output((B * C, FIELDS, n), fixed, dtype=acc)
    _launch(_ncc_box_kernel, grid, along_w, along_wh, n, W, H, FIELDS=FIELDS, WINDOW=window, ACC=ACC)
    partial = new_output((B * C, grid[0]), fixed, dtype=acc)
    # along_w is free once the H sweep has read it: it takes the coefficients
    _launch(
        _ncc_forward_kernel,
        grid,
        along_wh,
        partial,
        along_w,
        n,
        H * W,
        D,
        WINDOW=window,
        ACC=ACC,
        COEFFICIENTS=coefficients,
    )
    # a fixed-shape torch sum instead of atomics keeps the result deterministic
    return partial.view(B, -1).sum(dim=1) / (C * n), along_w if coefficients else None


def ncc_backward(
    grad_out: torch.Tensor, coef: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward sweeps over ``coef`` (from :func:`ncc_forward`; left unchanged, so a second backward
    gives the same); returns ``(grad_fixed, grad_moving)`` in the inputs' dtypes."""
    fixed, moving = fixed.contiguous(), moving.contiguous()
    B, C, D, H, W = fixed.shape
    n, acc = D * H * W, compute_dtype(fixed, moving)
    ACC = triton_dtype(acc)
    grid = (triton.cdiv(n, LAUNCH["local_ncc"].block), B * C)
    along_w = new_output(coef.shape, fixed, dtype=acc)
    _launch(_ncc_box_kernel, grid, coef, along_w, n, 1, W, FIELDS=FIELDS, WINDOW=window, ACC=ACC)
    along_wh = new_output(coef.shape, fixed, dtype=acc)
    _launch(_ncc_box_kernel, grid, along_w, along_wh, n, W, H, FIELDS=FIELDS, WINDOW=window, ACC=ACC)
    scale = (grad_out.to(acc) / (C * n)).contiguous()
    grad_fixed = new_output(fixed.shape, fixed, dtype=acc)
    grad_moving = new_output(moving.shape, moving, dtype=acc)
    _launch(
        _ncc_backward_kernel,
        grid,
        along_wh,
        fixed,
        moving,
        scale,
        grad_fixed,
        grad_moving,
        C,
        n,
        H * W,
        D,
        WINDOW=window,
        ACC=ACC,
    )
    return grad_fixed.to(fixed.dtype), grad_moving.to(moving.dtype)


class LocalNCCFunction(torch.autograd.Function):
    """Mean local NCC on the Triton kernels. When an input needs a gradient (``coefficients``) the forward keeps
    the gradient's per-voxel coefficients (5 values a voxel, in the compute dtype), so the backward sweeps only
    them instead of recomputing the sums: 116 bytes a voxel moved instead of 224 (``lumireg bench traffic``)."""

    @staticmethod
    def forward(ctx, fixed: torch.Tensor, moving: torch.Tensor, window: int, coefficients: bool) -> torch.Tensor:
        cc, coef = ncc_forward(fixed, moving, window, coefficients)
        if coefficients:
            ctx.save_for_backward(fixed, moving, coef)
        ctx.window = window
        return cc

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        fixed, moving, coef = ctx.saved_tensors
        grad_fixed, grad_moving = ncc_backward(grad_out, coef, fixed, moving, ctx.window)
        return (
            grad_fixed if ctx.needs_input_grad[0] else None,
            grad_moving if ctx.needs_input_grad[1] else None,
            None,
            None,
        )


def _box_sums(volume: torch.Tensor, window: int) -> torch.Tensor:
    """Sums of ``volume`` ``(B, C, D, H, W)`` over ``window`` consecutive voxels along D, H and W, zero-padded by
    ``window // 2`` (same shape).

    Along each axis, runs of 1, 2, 4, ... voxels are each made from the last by one addition, and those of
    ``window``'s binary digits added up: 4 additions for a window of 9 where shifted slices take 8 (on a CPU
    1.6-2x faster forward and backward at 9, 1.15x at 5).
    """
    pad = window // 2
    for dim in (4, 3, 2):
        size = volume.shape[dim]
        run = F.pad(volume, (0, 0) * (4 - dim) + (pad, pad))  # run[k]: sum of the padded voxels k .. k + width - 1
        width, start, total, digits = 1, 0, None, window
        while True:
            if digits & 1:
                piece = run.narrow(dim, start, size)
                total = piece if total is None else total + piece
                start += width
            digits >>= 1
            if not digits:
                break
            length = run.shape[dim] - width
            run, width = run.narrow(dim, 0, length) + run.narrow(dim, width, length), 2 * width
        volume = total
    return volume


def local_ncc_torch(fixed: torch.Tensor, moving: torch.Tensor, window: int = NCC_WINDOW) -> torch.Tensor:
    """The PyTorch twin of :func:`local_ncc`: separable box sums (:func:`_box_sums`) of all five fields together.

    Plain sums of shifted slices, not ``F.avg_pool3d`` (3-8x slower on a CPU, forward and backward) and not a
    mean scaled back. Autograd gives the backward.
    """
    acc = compute_dtype(fixed, moving)
    i, j = fixed.to(acc), moving.to(acc)
    sums = _box_sums(torch.cat([i, j, i * i, j * j, i * j], dim=1), window)
    s_i, s_j, s_ii, s_jj, s_ij = sums.chunk(FIELDS, dim=1)
    n = window**3
    cross = s_ij - s_i * s_j / n
    var_i = s_ii - s_i * s_i / n
    var_j = s_jj - s_j * s_j / n
    return (cross * cross / (var_i * var_j + EPS)).mean(dim=(1, 2, 3, 4))


def local_ncc(
    fixed: torch.Tensor, moving: torch.Tensor, window: int = NCC_WINDOW, backend: str = "auto"
) -> torch.Tensor:
    """Mean local normalised cross-correlation of two images, per sample.

    VoxelMorph's NCC with zero padding: box sums over a ``window**3`` cube
    centred on each voxel, ``cc = cross**2 / (var_fixed * var_moving + 1e-5)``,
    averaged over channels and voxels. Each channel is an independent image.
    The training loss is ``-local_ncc``.

    Args:
        fixed: ``(B, C, D, H, W)`` floating volume (float16, bfloat16, float32 or float64).
        moving: ``(B, C, D, H, W)`` floating volume on the same grid and device.
        window: odd side of the cubic window, in voxels (default :data:`lumireg.contract.NCC_WINDOW`, VoxelMorph's 9).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``lumireg.kernels``).

    Returns:
        ``(B,)`` in [0, 1] up to rounding, float32 (float64 if either input is float64; half
        inputs are accumulated in float32), differentiable in both inputs.
    """
    check_volume("fixed", fixed)
    check_volume("moving", moving)
    check_same_grid("fixed", fixed, "moving", moving)
    if fixed.shape[1] != moving.shape[1]:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same channels")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window!r}")
    if use_triton(backend, fixed):
        coefficients = torch.is_grad_enabled() and (fixed.requires_grad or moving.requires_grad)
        return LocalNCCFunction.apply(fixed, moving, window, coefficients)
    return local_ncc_torch(fixed, moving, window)
