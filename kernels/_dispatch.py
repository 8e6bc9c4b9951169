"""What every op shares: input checks, the choice of backend, output allocation, launches.

Backends: ``"auto"`` runs the Triton kernels on CUDA tensors and the PyTorch
twin on CPU tensors; ``"triton"`` forces the kernels (on CPU tensors only under
``TRITON_INTERPRET=1``, set before ``lumireg.kernels`` is imported, as the
tests do); ``"torch"`` forces the twin.

Every kernel runs through :func:`launch`, which launches it on its tensors'
GPU (Triton launches on the current CUDA device, so inputs on ``cuda:1``
would otherwise fail or run on ``cuda:0``), sized from :data:`LAUNCH` and
counted in :data:`launches`.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import NamedTuple

import torch
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")


class Launch(NamedTuple):
    """Voxels per program (``BLOCK``, a power of two) and warps per program of an op's kernels."""

    block: int
    num_warps: int


# Every op's launch size, in one place; chosen without a GPU. `lumireg bench kernels --sweep-blocks`
# times the alternatives on one. mutual_information's entry is for <= 32 bins (see its _launch_shape).
LAUNCH = {
    "warp": Launch(1024, 4),
    "integrate": Launch(1024, 4),  # the warp kernels in residual mode, one launch per squaring
    "local_ncc": Launch(1024, 4),
    "mutual_information": Launch(128, 4),
}

# Kernel launches so far, by kernel name (tests and `lumireg bench kernels` read and clear it).
launches: Counter[str] = Counter()

# Tests set this to fill every kernel output with NaN (or -1 for integers) before
# the kernel runs, so an element a kernel forgets to write shows up.
poison_outputs = False


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernels under ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before lumireg.kernels is "
            "imported; use CUDA tensors, or backend='torch' for the PyTorch twin"
        )
    return True


def check_volume(name: str, tensor: torch.Tensor, channels: int | None = None, allow_int: bool = False) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a ``(B, C, D, H, W)`` floating volume.

    ``channels`` pins C; ``allow_int`` also admits integer dtypes (label maps).
    Every spatial size must be at least 2 voxels, since voxel centres sit at
    integer coordinates and a size-1 axis has no extent to interpolate over.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 5:
        raise ValueError(f"{name} must have shape (B, C, D, H, W), got {tuple(tensor.shape)}")
    if channels is not None and tensor.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(tensor.shape)}")
    if not (tensor.is_floating_point() or (allow_int and not tensor.is_complex() and tensor.dtype != torch.bool)):
        kinds = "a floating or integer" if allow_int else "a floating"
        raise ValueError(f"{name} must have {kinds} dtype, got {tensor.dtype}")
    if min(tensor.shape[2:]) < 2:
        raise ValueError(f"{name} needs every spatial size >= 2 voxels, got {tuple(tensor.shape)}")


def check_same_grid(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` share batch size, spatial size and device."""
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must share batch size and spatial size"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half inputs accumulate in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def triton_dtype(dtype: torch.dtype):
    """The ``tl`` dtype the kernels accumulate in for a torch compute dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output for a kernel to fill (poisoned when ``poison_outputs``)."""
    dtype = like.dtype if dtype is None else dtype
    if not poison_outputs:
        return torch.empty(shape, dtype=dtype, device=like.device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=like.device)


def device_guard(tensor: torch.Tensor):
    """A context that makes ``tensor``'s GPU the current CUDA device; nothing for CPU tensors (interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on the device of the first tensor in ``args``, counted in :data:`launches`."""
    launches[kernel.__name__] += 1
    with device_guard(next(a for a in args if isinstance(a, torch.Tensor))):
        kernel[grid](*args, **meta)
