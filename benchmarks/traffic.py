"""Bytes each kernel moves per voxel, counted under Triton's interpreter: ``lumireg bench traffic``.

On a GPU a memory-bound kernel's time is the bytes it moves over the memory's
bandwidth (about 3 TB/s on an H100), so the count says where each op stands
before any GPU is at hand. Every ``tl.load``, ``tl.store`` and atomic of every
launch of an op is recorded with its mask, and reported two ways, in bytes per
voxel per batch element:

- ``requested``: every active lane's access (a trilinear sample's 8 corners
  count 8 times): what the kernels ask of the caches;
- ``unique``: distinct addresses read plus distinct addresses written, per
  launch: what DRAM moves if the caches keep everything a launch touches
  and nothing between launches (an atomic add reads and writes its address).

``unique`` is the figure to hold against :data:`lumireg.benchmarks.kernels.MIN_BYTES_PER_VOXEL`,
the fewest bytes each op must move. Both are exact counts of this run, not
estimates; they depend on the launch size (``lumireg.kernels._dispatch.LAUNCH``)
only through lanes past a volume's end, which are masked and not counted.
Borders of a small volume mask some window taps, so counts at the default
32 x 40 x 48 sit a few per cent below those of LUMIR's canvas.

The interpreter must be on before ``lumireg.kernels`` is imported: ``run``
starts itself again in a child process with ``TRITON_INTERPRET=1`` when it is
not. Results: a table on the terminal and ``<out>/interpreter/traffic.json`` (counts
are the same on every machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lumireg.benchmarks.kernels import MIN_BYTES_PER_VOXEL, OPS, _setup
from lumireg.contract import EXIT_OK, EXIT_USAGE

DEFAULT_SHAPE = "32,40,48"
INTERPRETER = "Triton interpreter (counts, the same on every machine)"


@dataclass
class LaunchTraffic:
    """One kernel launch's accesses: requested bytes, and the addresses touched (by element size)."""

    kernel: str
    read_requested: int = 0
    write_requested: int = 0
    reads: dict[int, list[np.ndarray]] = field(default_factory=dict)
    writes: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def unique_bytes(self) -> tuple[int, int]:
        """Distinct bytes read and written by this launch."""

        def distinct(groups: dict[int, list[np.ndarray]]) -> int:
            return sum(size * np.unique(np.concatenate(parts)).size for size, parts in groups.items())

        return distinct(self.reads), distinct(self.writes)


def _record(groups: dict[int, list[np.ndarray]], ptrs, mask) -> int:
    """Add the active lanes' addresses of ``ptrs`` to ``groups``; return their requested bytes."""
    size = ptrs.get_element_ty().primitive_bitwidth // 8
    addresses = np.asarray(ptrs.data).ravel()
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape).ravel()]
    groups.setdefault(size, []).append(addresses.astype(np.uint64))
    return size * addresses.size


@contextlib.contextmanager
def counting() -> Iterator[list[LaunchTraffic]]:
    """Record every memory access of the Triton launches inside the block, one :class:`LaunchTraffic` each.

    Needs ``TRITON_INTERPRET=1`` (the interpreter executes each access in Python, where it can be seen).
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("counting traffic needs TRITON_INTERPRET=1 set before lumireg.kernels is imported")
    from triton.runtime import interpreter

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    saved = {
        name: getattr(builder, name)
        for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    }
    saved_call = executor.__call__
    launches: list[LaunchTraffic] = []

    def masked_load(self, ptrs, mask, *args):
        launches[-1].read_requested += _record(launches[-1].reads, ptrs, mask)
        return saved["create_masked_load"](self, ptrs, mask, *args)

    def masked_store(self, ptrs, value, mask, *args):
        launches[-1].write_requested += _record(launches[-1].writes, ptrs, mask)
        return saved["create_masked_store"](self, ptrs, value, mask, *args)

    def atomic_rmw(self, op, ptr, val, mask, *args):
        launches[-1].read_requested += _record(launches[-1].reads, ptr, mask)
        launches[-1].write_requested += _record(launches[-1].writes, ptr, mask)
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *args)

    def atomic_cas(self, ptr, *args):
        launches[-1].read_requested += _record(launches[-1].reads, ptr, None)
        launches[-1].write_requested += _record(launches[-1].writes, ptr, None)
        return saved["create_atomic_cas"](self, ptr, *args)

    def call(self, *args, **kwargs):
        launches.append(LaunchTraffic(self.fn.__name__))
        return saved_call(self, *args, **kwargs)

    patched = {
        "create_masked_load": masked_load,
        "create_masked_store": masked_store,
        "create_atomic_rmw": atomic_rmw,
        "create_atomic_cas": atomic_cas,
    }
    try:
        for name, fn in patched.items():
            setattr(builder, name, fn)
        executor.__call__ = call
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        executor.__call__ = saved_call


def _summary(launches: list[LaunchTraffic], voxels: int) -> dict:
    """Bytes per voxel of a pass's launches, in all and per kernel."""
    per_kernel: dict[str, dict] = {}
    for one in launches:
        read, write = one.unique_bytes()
        row = per_kernel.setdefault(one.kernel, {"launches": 0, "requested": 0.0, "unique": 0.0})
        row["launches"] += 1
        row["requested"] += (one.read_requested + one.write_requested) / voxels
        row["unique"] += (read + write) / voxels
    return {
        "launches": len(launches),
        "requested": sum(r["requested"] for r in per_kernel.values()),
        "unique": sum(r["unique"] for r in per_kernel.values()),
        "kernels": per_kernel,
    }


def measure(op: str, shape: tuple[int, int, int]) -> dict:
    """Bytes per voxel of ``op`` (:data:`lumireg.benchmarks.kernels.OPS`) at B = 1, float32, forward and backward.

    Inputs are those of ``lumireg bench kernels`` on ``shape`` voxels (CPU, the Triton path). ``fwd`` is the
    forward without autograd (inference); ``bwd`` the gradient call alone; ``fwd+bwd`` a training step: the
    forward with autograd (which may keep more for the backward) and the backward.
    Returns ``{"fwd": ..., "bwd": ..., "fwd+bwd": ...}``, each with ``launches``, ``requested``, ``unique`` and
    ``kernels`` (the same per kernel name).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    gen = torch.Generator().manual_seed(OPS.index(op))
    inputs, grad_idx, like, fn, _ = _setup(op, shape, 1, torch.device("cpu"), gen, backend="triton")
    voxels = shape[0] * shape[1] * shape[2]
    with torch.no_grad(), counting() as forward:
        fn(*inputs)
    leaves = [t.detach().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
    with counting() as forward_for_grad:
        out = fn(*leaves)
    with counting() as backward:
        torch.autograd.grad(out, [leaves[i] for i in grad_idx], torch.randn(like.shape, generator=gen))
    return {
        "fwd": _summary(forward, voxels),
        "bwd": _summary(backward, voxels),
        "fwd+bwd": _summary(forward_for_grad + backward, voxels),
    }


def _print_table(result: dict) -> None:
    head = f"{'op':<18} {'pass':<8} {'launches':>8} {'requested B/vox':>15} {'unique B/vox':>12} {'floor B/vox':>11}"
    print(head)
    print("-" * len(head))
    for op, passes in result.items():
        for name, row in passes.items():
            floor = MIN_BYTES_PER_VOXEL.get((op, name))
            print(
                f"{op:<18} {name:<8} {row['launches']:>8} {row['requested']:>15.1f} {row['unique']:>12.1f} "
                f"{'' if floor is None else floor:>11}"
            )


def add_arguments(parser) -> None:
    """``lumireg bench traffic``'s options."""
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.add_argument(
        "--shape", default=DEFAULT_SHAPE, help=f"volume size D,H,W in voxels (default: {DEFAULT_SHAPE})"
    )
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: every op of bench kernels)")
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for the results, a sub-folder per device (default: benchmarks/results)",
    )


def run(args) -> int:
    """``lumireg bench traffic``: EXIT_OK with the table and ``traffic.json`` written; EXIT_USAGE for bad options.

    Starts itself again with ``TRITON_INTERPRET=1`` when the interpreter is off (the child's exit code is returned).
    """
    try:
        shape = tuple(int(s) for s in args.shape.split(","))
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError
    except ValueError:
        print(f"lumireg bench traffic: --shape must be D,H,W, each >= 2, got {args.shape!r}", file=sys.stderr)
        return EXIT_USAGE
    ops = OPS if args.ops is None else tuple(args.ops.split(","))
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        print(f"lumireg bench traffic: unknown ops {unknown}; choose from {', '.join(OPS)}", file=sys.stderr)
        return EXIT_USAGE
    if os.environ.get("TRITON_INTERPRET") != "1":
        argv = [sys.executable, "-m", "lumireg", "bench", "traffic", "--shape", args.shape, "--out", args.out]
        argv += ["--ops", ",".join(ops)]
        return subprocess.run(argv, env={**os.environ, "TRITON_INTERPRET": "1"}).returncode

    from tqdm import tqdm

    from lumireg.benchmarks.machine import header

    result = {op: measure(op, shape) for op in tqdm(ops, desc="traffic", unit="op")}
    print(f"\nTriton interpreter, {'x'.join(map(str, shape))} voxels, float32, B = 1; bytes per voxel")
    _print_table(result)
    out = {
        **header("traffic", INTERPRETER),
        "shape": list(shape),
        "dtype": "float32",
        "units": {
            "requested": "bytes per voxel: every active lane's load, store and atomic",
            "unique": "bytes per voxel: distinct addresses read + written, per launch, summed over launches",
            "floor": "bytes per voxel each op must move (lumireg.benchmarks.kernels.MIN_BYTES_PER_VOXEL)",
        },
        "floor": {f"{op} {p}": v for (op, p), v in MIN_BYTES_PER_VOXEL.items()},
        "ops": result,
    }
    path = Path(args.out) / "interpreter" / "traffic.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    return EXIT_OK
