"""Warping a volume by a displacement field: trilinear (differentiable) or nearest (labels).

``out[b, c, x] = image[b, c](x + disp[b, :, x])`` for every voxel x of the
fixed grid: a pull-back, displacement in voxel units, channel k of ``disp``
along array axis k (D, H, W), voxel centres at integer coordinates
(grid_sample's ``align_corners=True``). The Triton kernels compute each sample
coordinate from the voxel index, so no identity grid is ever materialised.

The backward scatters the image gradient with atomic adds: on a GPU their
order varies from run to run, so float gradients of the image differ in the
last bits between identical runs (the interpreter and the PyTorch twin are
deterministic). The displacement gradient is written per voxel; through the
squaring steps of :func:`lumireg.kernels.integrate`, where the image is the
displacement, it inherits the variation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

MODES = ("bilinear", "nearest")
PADDINGS = ("zeros", "border")


@triton.jit
def _sample_coordinate(disp_ptr, offs, index, size, scale, mask, BORDER: tl.constexpr, ACC: tl.constexpr):
    """Source coordinate ``index + scale * disp`` along one axis and d(clamped)/d(coordinate) in {0, 1}."""
    x = index.to(ACC) + scale * tl.load(disp_ptr + offs, mask=mask, other=0).to(ACC)
    upper = (size - 1).to(ACC)
    if BORDER:
        # grid_sample's border mode: clamp, and no gradient on or past the edge
        slope = ((x > 0) & (x < upper)).to(ACC)
        x = tl.minimum(tl.maximum(x, 0.0), upper)
    else:
        # anything further out reads only zeros; the clamp keeps floor() inside int32
        slope = tl.full(x.shape, 1.0, ACC)
        x = tl.minimum(tl.maximum(x, -2.0), upper + 2.0)
    return x, slope


@triton.jit
def _sample_point(disp_ptr, b, offs, D, H, W, scale, mask, BORDER: tl.constexpr, ACC: tl.constexpr):
    """Source point of voxels ``offs`` of sample ``b`` (three coordinates) and their clamp slopes."""
    n = D * H * W
    base = disp_ptr + b * 3 * n
    xd, sd = _sample_coordinate(base, offs, offs // (H * W), D, scale, mask, BORDER, ACC)
    xh, sh = _sample_coordinate(base + n, offs, (offs // W) % H, H, scale, mask, BORDER, ACC)
    xw, sw = _sample_coordinate(base + 2 * n, offs, offs % W, W, scale, mask, BORDER, ACC)
    return xd, xh, xw, sd, sh, sw


@triton.jit
def _floor_split(x):
    """Lower neighbour index (int32) and the fractional position above it."""
    lower = tl.floor(x)
    return lower.to(tl.int32), x - lower


@triton.jit
def _round_half_even(x):
    """rint(), as grid_sample's nearest mode rounds."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((r - x == 0.5) & odd, r - 1.0, r)


@triton.jit
def _warp_forward_kernel(
    image_ptr,
    disp_ptr,
    out_ptr,
    C,
    D,
    H,
    W,
    scale,
    NEAREST: tl.constexpr,
    BORDER: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    n = D * H * W
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xd, xh, xw, _, _, _ = _sample_point(disp_ptr, b, offs, D, H, W, scale, mask, BORDER, ACC)
    if NEAREST:
        d0 = _round_half_even(xd).to(tl.int32)
        h0 = _round_half_even(xh).to(tl.int32)
        w0 = _round_half_even(xw).to(tl.int32)
        valid = mask & (d0 >= 0) & (d0 < D) & (h0 >= 0) & (h0 < H) & (w0 >= 0) & (w0 < W)
        src = (d0 * H + h0) * W + w0
        for c in range(C):
            plane = (b * C + c) * n
            # label values are copied, never converted through a float
            tl.store(out_ptr + plane + offs, tl.load(image_ptr + plane + src, mask=valid, other=0), mask=mask)
    else:
        d0, td = _floor_split(xd)
        h0, th = _floor_split(xh)
        w0, tw = _floor_split(xw)
        for c in range(C):
            plane = (b * C + c) * n
            acc = tl.zeros([BLOCK], ACC)
            for i in tl.static_range(2):
                wd = td if i == 1 else 1.0 - td
                di = d0 + i
                for j in tl.static_range(2):
                    wh = th if j == 1 else 1.0 - th
                    hj = h0 + j
                    for k in tl.static_range(2):
                        ww = tw if k == 1 else 1.0 - tw
                        wk = w0 + k
                        valid = mask & (di >= 0) & (di < D) & (hj >= 0) & (hj < H) & (wk >= 0) & (wk < W)
                        v = tl.load(image_ptr + plane + (di * H + hj) * W + wk, mask=valid, other=0).to(ACC)
                        acc += wd * wh * ww * v
            if RESIDUAL:
                acc += tl.load(image_ptr + plane + offs, mask=mask, other=0).to(ACC)
            tl.store(out_ptr + plane + offs, scale * acc, mask=mask)


@triton.jit
def _warp_backward_kernel(
    image_ptr,
    disp_ptr,
    grad_out_ptr,
    grad_image_ptr,
    grad_disp_ptr,
    C,
    D,
    H,
    W,
    scale,
    BORDER: tl.constexpr,
    IMAGE_GRAD: tl.constexpr,
    DISP_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    n = D * H * W
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    xd, xh, xw, sd, sh, sw = _sample_point(disp_ptr, b, offs, D, H, W, scale, mask, BORDER, ACC)
    d0, td = _floor_split(xd)
    h0, th = _floor_split(xh)
    w0, tw = _floor_split(xw)
    gxd = tl.zeros([BLOCK], ACC)
    gxh = tl.zeros([BLOCK], ACC)
    gxw = tl.zeros([BLOCK], ACC)
    for c in range(C):
        plane = (b * C + c) * n
        # d/d(image) and d/d(disp) of warp(scale * image, scale * disp) both carry one factor scale
        g = scale * tl.load(grad_out_ptr + plane + offs, mask=mask, other=0).to(ACC)
        for i in tl.static_range(2):
            wd = td if i == 1 else 1.0 - td
            sgn_d = 1.0 if i == 1 else -1.0
            di = d0 + i
            for j in tl.static_range(2):
                wh = th if j == 1 else 1.0 - th
                sgn_h = 1.0 if j == 1 else -1.0
                hj = h0 + j
                for k in tl.static_range(2):
                    ww = tw if k == 1 else 1.0 - tw
                    sgn_w = 1.0 if k == 1 else -1.0
                    wk = w0 + k
                    valid = mask & (di >= 0) & (di < D) & (hj >= 0) & (hj < H) & (wk >= 0) & (wk < W)
                    src = plane + (di * H + hj) * W + wk
                    if IMAGE_GRAD:
                        # relaxed: only the sum matters, the adds need no ordering (acq_rel would fence each)
                        tl.atomic_add(grad_image_ptr + src, g * (wd * wh * ww), mask=valid, sem="relaxed")
                    if DISP_GRAD:
                        gv = g * scale * tl.load(image_ptr + src, mask=valid, other=0).to(ACC)
                        gxd += gv * (sgn_d * wh * ww)
                        gxh += gv * (wd * sgn_h * ww)
                        gxw += gv * (wd * wh * sgn_w)
    if DISP_GRAD:
        grad_base = grad_disp_ptr + b * 3 * n
        tl.store(grad_base + offs, gxd * sd, mask=mask)
        tl.store(grad_base + n + offs, gxh * sh, mask=mask)
        tl.store(grad_base + 2 * n + offs, gxw * sw, mask=mask)


def _launch(kernel, image: torch.Tensor, *args, op: str, **meta) -> None:
    block, warps = LAUNCH[op]
    grid = (triton.cdiv(image[0, 0].numel(), block), image.shape[0])
    launch(kernel, grid, image, *args, **meta, BLOCK=block, num_warps=warps)


def warp_forward(
    image: torch.Tensor,
    disp: torch.Tensor,
    nearest: bool = False,
    border: bool = False,
    residual: bool = False,
    scale: float = 1.0,
    op: str = "warp",
) -> torch.Tensor:
    """Launch the forward kernel: ``warp(s * image, s * disp)``, plus ``s * image`` itself when ``residual``.

    ``residual=True`` with ``image is disp`` is one scaling-and-squaring step
    ``u + warp(u, u)`` of ``u = s * image``, ``s = scale`` (trilinear only; it
    reaches the kernel as float32, so use a power of two in float64 runs).
    ``op`` names the :data:`LAUNCH` entry that sizes the launch. Shapes as in
    :func:`warp`; output dtype is ``image``'s.
    """
    image, disp = image.contiguous(), disp.contiguous()
    out = new_output(image.shape, image)
    _launch(
        _warp_forward_kernel,
        image,
        disp,
        out,
        image.shape[1],
        *image.shape[2:],
        scale,
        op=op,
        NEAREST=nearest,
        BORDER=border,
        RESIDUAL=residual,
        ACC=triton_dtype(compute_dtype(image, disp)),
    )
    return out


def warp_backward(
    grad_out: torch.Tensor,
    image: torch.Tensor,
    disp: torch.Tensor,
    border: bool = False,
    image_grad: bool = True,
    disp_grad: bool = True,
    scale: float = 1.0,
    op: str = "warp",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel of trilinear ``warp(s * image, s * disp)``; returns ``(grad_image, grad_disp)``.

    The sample weights are recomputed from ``disp`` rather than saved. Image
    gradients are scattered with atomic adds in the accumulation dtype: on a
    GPU the order of the adds, hence the last bits, varies between runs.
    ``scale`` and ``op`` as in :func:`warp_forward`.
    """
    grad_out, image, disp = grad_out.contiguous(), image.contiguous(), disp.contiguous()
    acc = compute_dtype(image, disp)
    grad_image = torch.zeros(image.shape, dtype=acc, device=image.device) if image_grad else None
    grad_disp = new_output(disp.shape, disp, dtype=acc) if disp_grad else None
    _launch(
        _warp_backward_kernel,
        image,
        disp,
        grad_out,
        grad_image,
        grad_disp,
        image.shape[1],
        *image.shape[2:],
        scale,
        op=op,
        BORDER=border,
        IMAGE_GRAD=image_grad,
        DISP_GRAD=disp_grad,
        ACC=triton_dtype(acc),
    )
    return (
        None if grad_image is None else grad_image.to(image.dtype),
        None if grad_disp is None else grad_disp.to(disp.dtype),
    )


class WarpFunction(torch.autograd.Function):
    """Trilinear warp on the Triton kernels; saves only the inputs."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, disp: torch.Tensor, border: bool) -> torch.Tensor:
        ctx.save_for_backward(image, disp)
        ctx.border = border
        return warp_forward(image, disp, border=border)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        image, disp = ctx.saved_tensors
        grad_image, grad_disp = warp_backward(
            grad_out, image, disp, ctx.border, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return grad_image, grad_disp, None


def warp_torch(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding: str = "zeros") -> torch.Tensor:
    """The PyTorch twin of :func:`warp`, on ``F.grid_sample``.

    The sample coordinates ``index + disp``, normalised for ``align_corners=True``, are one addition per axis
    (the scaled ``arange`` plus the scaled displacement) in grid_sample's order (W, H, D), written straight into
    its grid when no gradient is wanted (stacked otherwise: ``out=`` has no autograd).
    """
    acc = compute_dtype(image, disp)
    if not image.is_floating_point() and image.numel() and image.abs().max() >= 2**24:
        acc = torch.float64  # float32 holds integer labels exactly only below 2**24
    differentiable = torch.is_grad_enabled() and (image.requires_grad or disp.requires_grad)
    grid = None if differentiable else torch.empty((disp.shape[0], *disp.shape[2:], 3), dtype=acc, device=disp.device)
    coords = []
    for axis, size in enumerate(image.shape[2:]):
        scale = 2.0 / (size - 1)
        index = torch.arange(size, dtype=acc, device=disp.device) * scale - 1.0
        index = index.view([-1 if a == axis else 1 for a in range(3)])
        into = None if grid is None else grid[..., 2 - axis]
        coords.append(torch.add(index, disp[:, axis].to(acc), alpha=scale, out=into))
    if grid is None:
        grid = torch.stack(coords[::-1], dim=-1)
    out = F.grid_sample(image.to(acc), grid, mode=mode, padding_mode=padding, align_corners=True)
    return out.to(image.dtype)


def warp(
    image: torch.Tensor,
    disp: torch.Tensor,
    mode: str = "bilinear",
    padding: str = "zeros",
    backend: str = "auto",
) -> torch.Tensor:
    """Pull ``image`` back onto the fixed grid through ``disp``.

    Args:
        image: ``(B, C, D, H, W)`` floating volume; in ``"nearest"`` mode also
            an integer label map.
        disp: ``(B, 3, D, H, W)`` displacement in voxel units, channel k along
            array axis k, on the same grid as ``image`` (any float dtype).
        mode: ``"bilinear"`` (trilinear, differentiable in ``image`` and
            ``disp``) or ``"nearest"`` (for labels; rounds half to even like
            grid_sample; no gradient).
        padding: ``"zeros"`` (outside the volume reads 0) or ``"border"``
            (coordinates clamped to the volume).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``lumireg.kernels``).

    Returns:
        ``(B, C, D, H, W)``, ``image``'s dtype: ``out[b, c, x] = image[b, c](x + disp[b, :, x])``.
        Half-precision inputs are accumulated in float32.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    check_volume("image", image, allow_int=mode == "nearest")
    check_volume("disp", disp, channels=3)
    check_same_grid("image", image, "disp", disp)
    triton_path = use_triton(backend, image)
    if mode == "nearest":
        with torch.no_grad():
            if triton_path:
                return warp_forward(image, disp, nearest=True, border=padding == "border")
            return warp_torch(image, disp, mode, padding)
    if triton_path:
        return WarpFunction.apply(image, disp, padding == "border")
    return warp_torch(image, disp, mode, padding)
