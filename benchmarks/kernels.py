"""Kernel micro-benchmark: lumireg's kernels against the PyTorch paths users run today.

``lumireg bench kernels`` times, at one volume size (voxels; default LUMIR's
160 x 224 x 192) and for each batch size, in float32, the forward pass and the
forward + backward pass of

- ``warp``: ours vs ``F.grid_sample`` on a stored identity grid (VoxelMorph's
  ``SpatialTransformer``);
- ``integrate`` (7 squarings): ours vs VoxelMorph's ``VecInt`` on that transformer;
- ``local_ncc`` (9^3 window): ours vs VoxelMorph's ``NCC`` on ``F.conv3d`` with a
  ones kernel;
- ``mutual_information`` (32 bins, sigma 0.5 bin spacings): ours vs the Parzen-window
  MI that training ran before it had a kernel, in PyTorch (dense per-voxel weights
  and one ``bmm``; MONAI's ``GlobalMutualInformationLoss`` with its Gaussian
  kernel works the same way, but MONAI is not a dependency).

Each op is first checked against its reference on the same inputs (output, and
gradients for the same upstream gradient); a mismatch fails the run. Times are
medians in milliseconds: CUDA events on a GPU (L2 flushed before each call),
``time.perf_counter`` on CPU, where "ours" is the op's PyTorch twin (path
``torch-twin``: the Triton kernels need a GPU). On the Triton path each row
also counts the kernel launches of one call. Results: a table on the
terminal and ``<out>/<device-slug>/kernels.json``.

``--sweep-blocks`` (GPU only) then times each op, B = 1, over voxels per
program x warps per program (:data:`SWEEP_BLOCKS` x :data:`SWEEP_WARPS`; the
sizes ``lumireg.kernels._dispatch.LAUNCH`` holds), checks every size against
the reference and writes the fastest correct forward + backward per op under
``"sweep"``, into ``kernels-sweep.json`` instead (a sweep does not replace the
timings of other batch sizes). Not ``triton.autotune``: the warp backward's
atomics would add twice into the same gradient while it tried sizes, and
NCC's partial sums are a buffer sized from the block.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lumireg.kernels as kernels
from lumireg.benchmarks.machine import device_name, header, slug
from lumireg.contract import EXIT_FAILURE, EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_USAGE
from lumireg.kernels import _dispatch
from lumireg.kernels._dispatch import use_triton

OPS = ("warp", "integrate", "local_ncc", "mutual_information")
STEPS = 7  # scaling-and-squaring steps (LUMIR convention)
WINDOW = 9  # local NCC window, voxels per side
BINS, SIGMA = 32, 0.5  # mutual information: bins per image, Gaussian width in bin spacings
RTOL = 1e-3  # an element mismatches when |ours - ref| > RTOL * max |ref|
# Gradient elements allowed to mismatch: trilinear's gradient jumps at integer sample
# coordinates, where ours and grid_sample may round a coordinate into different cells.
GRAD_MISMATCH = 1e-3
# Fewest bytes per voxel per batch element each op must move: the floors against an H100's ~3.0 TB/s.
# mutual_information has none: 2 x 32 exponentials and 2 x 32^2 multiply-adds per voxel bound it, not 8 bytes.
MIN_BYTES_PER_VOXEL = {("warp", "fwd"): 20, ("integrate", "fwd"): 24 * STEPS, ("local_ncc", "fwd+bwd"): 48}
H100_BYTES_PER_S = 3.0e12
# Defaults per device for options left unset: LUMIR's canvas on a GPU; half of it on a
# CPU, where the conv3d and grid_sample references alone take minutes at full size.
DEFAULTS = {
    "cuda": {"shape": "160,224,192", "batch_sizes": "1,4", "warmup": 3, "repeats": 10},
    "cpu": {"shape": "80,112,96", "batch_sizes": "1", "warmup": 1, "repeats": 3},
}
# --sweep-blocks: voxels per program x warps per program; MI holds a BLOCK x bins tile per program in registers
SWEEP_BLOCKS = {op: (256, 512, 1024, 2048) for op in OPS} | {"mutual_information": (32, 64, 128, 256)}
SWEEP_WARPS = (2, 4, 8)
REFERENCES = {
    "warp": "grid_sample + stored grid",
    "integrate": f"VecInt ({STEPS}x grid_sample + grid)",
    "local_ncc": f"conv3d ones {WINDOW}^3",
    "mutual_information": f"Parzen {BINS} bins, dense + bmm",
}


class GridTransformer(torch.nn.Module):
    """VoxelMorph's ``SpatialTransformer``: ``F.grid_sample`` on a stored grid of voxel coordinates.

    ``forward(src (B, C, D, H, W), flow (B, 3, D, H, W) in voxels)`` pulls ``src``
    back through ``flow``, trilinear, zero padding, ``align_corners=True``.
    """

    def __init__(self, size: tuple[int, int, int]):
        super().__init__()
        grid = torch.stack(torch.meshgrid([torch.arange(s) for s in size], indexing="ij")).unsqueeze(0).float()
        self.register_buffer("grid", grid, persistent=False)

    def forward(self, src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        new_locs = self.grid + flow
        shape = flow.shape[2:]
        for i in range(len(shape)):
            new_locs[:, i, ...] = 2 * (new_locs[:, i, ...] / (shape[i] - 1) - 0.5)
        new_locs = new_locs.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
        return F.grid_sample(src, new_locs, align_corners=True, mode="bilinear")


def vecint_reference(transformer: GridTransformer, vec: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """VoxelMorph's ``VecInt``: ``(B, 3, D, H, W)`` velocity (voxels) -> displacement (voxels)."""
    vec = vec * (1.0 / 2**steps)
    for _ in range(steps):
        vec = vec + transformer(vec, vec)
    return vec


def ncc_reference(fixed: torch.Tensor, moving: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """VoxelMorph's local NCC on ``F.conv3d``: ``(B, 1, D, H, W)`` pair -> ``(B,)`` mean local cc.

    Zero padding, ``window``^3 voxels; VoxelMorph's loss is minus the batch mean of this.
    """
    ones = torch.ones(1, 1, window, window, window, dtype=fixed.dtype, device=fixed.device)
    n = window**3
    I, J = fixed, moving  # noqa: E741 (VoxelMorph's names, kept so the reference reads as its source)
    I_sum, J_sum, I2_sum, J2_sum, IJ_sum = (F.conv3d(t, ones, padding=window // 2) for t in (I, J, I * I, J * J, I * J))
    u_I, u_J = I_sum / n, J_sum / n
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * n
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * n
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * n
    cc = cross * cross / (I_var * J_var + 1e-5)
    return cc.flatten(1).mean(1)


def parzen_mi_reference(fixed: torch.Tensor, moving: torch.Tensor, bins: int = BINS, sigma: float = SIGMA):
    """The Parzen-window MI training used before the kernel: ``(B, 1, D, H, W)`` pair in 0..1 -> ``(B,)`` nats.

    Dense ``(B, N, bins)`` Gaussian weights per image, normalised per voxel, and
    one ``bmm`` for the joint histogram; float32.
    """
    centres = torch.linspace(0.0, 1.0, bins, device=fixed.device, dtype=torch.float32)
    spread = 2.0 * (sigma / (bins - 1)) ** 2

    def weights(image: torch.Tensor) -> torch.Tensor:  # (B, N, bins)
        x = image.float().flatten(1).clamp(0.0, 1.0).unsqueeze(-1)
        w = torch.exp(-((x - centres) ** 2) / spread)
        return w / w.sum(-1, keepdim=True)

    wf, wm = weights(fixed), weights(moving)
    joint = torch.bmm(wf.transpose(1, 2), wm) / wf.shape[1]  # (B, bins, bins)
    pf, pm = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    return (joint * torch.log((joint + 1e-10) / (pf * pm + 1e-10))).sum((1, 2))


def _smooth(batch, channels, shape, amplitude, factor, gen, device) -> torch.Tensor:
    """A random field in [-amplitude, amplitude], trilinear from a grid ``factor`` times coarser."""
    coarse = [max(2, s // factor) for s in shape]
    low = (torch.rand(batch, channels, *coarse, generator=gen) * 2 - 1) * amplitude
    return F.interpolate(low.to(device), size=tuple(shape), mode="trilinear", align_corners=True)


def _setup(op, shape, batch, device, gen, backend="auto"):
    """Inputs, indices of those that take gradients, upstream gradient, ours (on ``backend``) and the reference."""
    if op == "warp":
        image = _smooth(batch, 1, shape, 0.5, 4, gen, device) + 0.5
        disp = _smooth(batch, 3, shape, 5.0, 16, gen, device)
        transformer = GridTransformer(shape).to(device)
        return (image, disp), (0, 1), image, lambda i, d: kernels.warp(i, d, backend=backend), transformer
    if op == "integrate":
        velocity = _smooth(batch, 3, shape, 10.0, 16, gen, device)
        transformer = GridTransformer(shape).to(device)
        return (
            (velocity,),
            (0,),
            velocity,
            lambda v: kernels.integrate(v, STEPS, backend),
            lambda v: vecint_reference(transformer, v),
        )
    fixed = _smooth(batch, 1, shape, 0.5, 4, gen, device) + 0.5
    moving = 0.7 * fixed + 0.3 * (_smooth(batch, 1, shape, 0.5, 4, gen, device) + 0.5)
    # training differentiates the loss in the (warped) moving image only
    if op == "mutual_information":
        # another contrast: a non-monotonic remap of the moving image
        moving = 1 - (2 * moving - 1) ** 2
        return (
            (fixed, moving),
            (1,),
            fixed[:, 0, 0, 0, 0],
            lambda f, m: kernels.mutual_information(f, m, BINS, SIGMA, backend),
            parzen_mi_reference,
        )
    ours = lambda f, m: kernels.local_ncc(f, m, WINDOW, backend)  # noqa: E731
    return (fixed, moving), (1,), fixed[:, 0, 0, 0, 0], ours, ncc_reference


def _forward_backward(fn, inputs, grad_idx, grad_out):
    x = [t.detach().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
    out = fn(*x)
    return out.detach(), torch.autograd.grad(out, [x[i] for i in grad_idx], grad_out)


def _compare(ours, ref):
    """``(max |ours - ref|, fraction of elements off by more than RTOL * max |ref|)`` over tensor pairs."""
    max_abs, bad, total = 0.0, 0, 0
    for a, b in zip(ours, ref):
        diff = (a.double() - b.double()).abs()
        max_abs = max(max_abs, diff.max().item())
        bad += (~(diff <= RTOL * b.abs().max().item())).sum().item()  # NaN counts as a mismatch
        total += diff.numel()
    return max_abs, bad / total


def _launch_count(fn) -> int:
    """Triton kernel launches made by ``fn()`` (0 on the twins)."""
    _dispatch.launches.clear()
    fn()
    return sum(_dispatch.launches.values())


def _median_ms(fn, warmup: int, repeats: int, cuda: bool) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _pass_call(fn, inputs, grad_idx, grad_out, pass_):
    """``() -> None`` running ``fn`` forward without autograd (``pass_ == "fwd"``) or forward + backward."""
    if pass_ == "fwd":

        def call():
            with torch.no_grad():
                fn(*inputs)

        return call
    leaves = [t.detach().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
    wrt = [leaves[i] for i in grad_idx]
    return lambda: torch.autograd.grad(fn(*leaves), wrt, grad_out)


def _run_case(op, shape, batch, device, args) -> list[dict]:
    """Check ours against the reference, then time both, forward and forward + backward: two rows."""
    gen = torch.Generator().manual_seed(1000 * OPS.index(op) + batch)
    inputs, grad_idx, like, ours, ref = _setup(op, shape, batch, device, gen)
    grad_out = torch.randn(like.shape, generator=gen).to(device)
    cuda = device.type == "cuda"
    rows = [
        {
            "op": op,
            "pass": p,
            "batch": batch,
            "path": "triton" if use_triton("auto", inputs[0]) else "torch-twin",
            "reference": REFERENCES[op],
        }
        for p in ("fwd", "fwd+bwd")
    ]
    ref_out, ref_grads = _forward_backward(ref, inputs, grad_idx, grad_out)
    our_out, our_grads = _forward_backward(ours, inputs, grad_idx, grad_out)
    for row, pair, allowed in zip(rows, (([our_out], [ref_out]), (our_grads, ref_grads)), (0.0, GRAD_MISMATCH)):
        max_abs, mismatch = _compare(*pair)
        row.update(max_abs_diff=max_abs, mismatch_fraction=mismatch, check="ok" if mismatch <= allowed else "FAIL")
    del ref_out, ref_grads, our_out, our_grads

    voxels = batch * shape[0] * shape[1] * shape[2]
    for row in rows:
        if row["path"] == "triton":
            row["launches"] = _launch_count(_pass_call(ours, inputs, grad_idx, grad_out, row["pass"]))
        for side, fn in (("ours", ours), ("ref", ref)):
            call = _pass_call(fn, inputs, grad_idx, grad_out, row["pass"])
            row[f"{side}_ms"] = _median_ms(call, args.warmup, args.repeats, cuda)
        row["speedup"] = row["ref_ms"] / row["ours_ms"]
        per_voxel = MIN_BYTES_PER_VOXEL.get((op, row["pass"]))
        if cuda and per_voxel:
            row["ours_TBps"] = per_voxel * voxels / (row["ours_ms"] * 1e-3) / 1e12
            row["floor_ms_h100"] = per_voxel * voxels / H100_BYTES_PER_S * 1e3
    return rows


def _sweep_op(op, shape, device, args) -> dict:
    """Time ``op`` at B = 1 for every launch size of :data:`SWEEP_BLOCKS` x :data:`SWEEP_WARPS`.

    Each size is checked against the reference first (a wrong result is ``"check": "FAIL"``; one
    that does not compile or launch is recorded with its error). Returns the sizes, their medians
    (ms) and ``best``: the correct size with the fastest forward + backward, or ``None``.
    """
    gen = torch.Generator().manual_seed(1000 * OPS.index(op) + 1)
    inputs, grad_idx, like, ours, ref = _setup(op, shape, 1, device, gen)
    grad_out = torch.randn(like.shape, generator=gen).to(device)
    ref_out, ref_grads = _forward_backward(ref, inputs, grad_idx, grad_out)
    default, cuda, configs = _dispatch.LAUNCH[op], device.type == "cuda", []
    try:
        for block in SWEEP_BLOCKS[op]:
            for warps in SWEEP_WARPS:
                config = {"block": block, "num_warps": warps}
                _dispatch.LAUNCH[op] = _dispatch.Launch(block, warps)
                try:
                    out, grads = _forward_backward(ours, inputs, grad_idx, grad_out)
                    ok = _compare([out], [ref_out])[1] == 0 and _compare(grads, ref_grads)[1] <= GRAD_MISMATCH
                    config["check"] = "ok" if ok else "FAIL"
                    for p in ("fwd", "fwd+bwd"):
                        call = _pass_call(ours, inputs, grad_idx, grad_out, p)
                        config[f"{p}_ms"] = _median_ms(call, args.warmup, args.repeats, cuda)
                except Exception as exc:  # a size that does not fit (registers, shared memory) is no result
                    config["error"] = f"{type(exc).__name__}: {exc}"[:300]
                configs.append(config)
    finally:
        _dispatch.LAUNCH[op] = default
    ok = [c for c in configs if c.get("check") == "ok"]
    best = min(ok, key=lambda c: c["fwd+bwd_ms"]) if ok else None
    return {"default": default._asdict(), "best": best, "configs": configs}


def _print_table(rows, cuda: bool) -> None:
    head = (
        f"{'op':<18} {'pass':<8} {'B':>2} {'path':<10} {'ours ms':>9} {'ref ms':>9} {'speed-up':>8} "
        f"{'max|diff|':>9} {'check':<5}"
    )
    print(head + (f" {'TB/s':>5} {'floor ms':>8}" if cuda else ""))
    print("-" * len(head) + ("-" * 15 if cuda else ""))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<18} {r['pass']:<8} {r['batch']:>2} ERROR: {r['error']}")
            continue
        line = (
            f"{r['op']:<18} {r['pass']:<8} {r['batch']:>2} {r['path']:<10} {r['ours_ms']:>9.3f} {r['ref_ms']:>9.3f} "
            f"{r['speedup']:>7.2f}x {r['max_abs_diff']:>9.1e} {r['check']:<5}"
        )
        if cuda and "ours_TBps" in r:
            line += f" {r['ours_TBps']:>5.2f} {r['floor_ms_h100']:>8.3f}"
        print(line)


def _print_sweep(sweep: dict) -> None:
    """Per op: the fastest correct launch size and the default one, forward + backward medians (ms)."""
    print(f"\n{'op':<18} {'best BLOCK x warps':>18} {'fwd+bwd ms':>10} {'default':>10} {'fwd+bwd ms':>10}")
    for op, found in sweep.items():
        ms = {(c["block"], c["num_warps"]): c.get("fwd+bwd_ms", float("nan")) for c in found["configs"]}
        best, default = found["best"], tuple(found["default"].values())
        size = f"{best['block']} x {best['num_warps']}" if best else "none correct"
        best_ms = best["fwd+bwd_ms"] if best else float("nan")
        default_ms = ms.get(default, float("nan"))
        print(f"{op:<18} {size:>18} {best_ms:>10.3f} {f'{default[0]} x {default[1]}':>10} {default_ms:>10.3f}")


def add_arguments(parser) -> None:
    """``lumireg bench kernels``'s options; those left unset take the device's :data:`DEFAULTS`."""
    gpu, cpu = DEFAULTS["cuda"], DEFAULTS["cpu"]
    default = lambda name: f"(default: GPU {gpu[name]}; CPU {cpu[name]})"  # noqa: E731
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where to run (default: auto, cuda when torch sees a GPU)",
    )
    parser.add_argument("--shape", help=f"volume size D,H,W in voxels {default('shape')}")
    parser.add_argument("--batch-sizes", help=f"comma-separated batch sizes {default('batch_sizes')}")
    parser.add_argument("--warmup", type=int, help=f"untimed calls before timing {default('warmup')}")
    parser.add_argument("--repeats", type=int, help=f"timed calls; the median is reported {default('repeats')}")
    parser.add_argument(
        "--sweep-blocks",
        action="store_true",
        help="GPU only: also time each op over BLOCK x num_warps and write the fastest to the results",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for the results, a sub-folder per device (default: benchmarks/results)",
    )


def run(args) -> int:
    """``lumireg bench kernels``: EXIT_OK if every op ran and matched its reference, else EXIT_FAILURE;
    EXIT_USAGE for bad options, EXIT_MISSING_DEPENDENCY for ``--device cuda`` or ``--sweep-blocks``
    without a GPU (the sweep times Triton launch sizes; the interpreter's times say nothing of them).

    Uses ``args.shape`` ("D,H,W", voxels), ``args.batch_sizes`` ("1,4"),
    ``args.warmup`` / ``args.repeats`` (calls), ``args.device`` ("auto", "cuda"
    or "cpu"), ``args.sweep_blocks`` and ``args.out`` (results folder; one sub-folder per device).
    Options that are ``None`` take the device's ``DEFAULTS``.
    """
    if args.device not in ("auto", "cuda", "cpu"):
        print(f"lumireg bench kernels: --device must be auto, cuda or cpu, got {args.device!r}", file=sys.stderr)
        return EXIT_USAGE
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lumireg bench kernels: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    sweep_blocks = getattr(args, "sweep_blocks", False)
    if sweep_blocks and not cuda:
        print("lumireg bench kernels: --sweep-blocks times the Triton kernels and needs a GPU", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    for name, value in DEFAULTS["cuda" if cuda else "cpu"].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    try:
        shape = tuple(int(s) for s in args.shape.split(","))
        batches = [int(b) for b in args.batch_sizes.split(",")]
        if len(shape) != 3 or min(shape) < 2 or min(batches) < 1 or args.repeats < 1 or args.warmup < 0:
            raise ValueError
    except ValueError:
        print(
            f"lumireg bench kernels: need --shape D,H,W (each >= 2), --batch-sizes of ints >= 1, --repeats >= 1, "
            f"--warmup >= 0; got {args.shape!r}, {args.batch_sizes!r}, {args.repeats}, {args.warmup}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    device = torch.device("cuda" if cuda else "cpu")
    device_label = device_name(cuda)
    if not cuda:
        print("CPU run: 'ours' is each op's PyTorch twin (path torch-twin); the Triton kernels need a GPU.")

    rows: list[dict] = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 means float32: conv3d would otherwise sum in tf32
    try:
        cases = [(op, b) for b in batches for op in OPS]
        for op, batch in (bar := tqdm(cases, desc="kernels", unit="case")):
            bar.set_postfix_str(f"{op} B={batch}")
            try:
                rows += _run_case(op, shape, batch, device, args)
            except Exception as exc:  # report the case as failed and go on with the others
                detail = "" if isinstance(exc, NotImplementedError) else traceback.format_exc()
                tqdm.write(f"{op} B={batch} failed: {type(exc).__name__}: {exc}\n{detail}", file=sys.stderr)
                rows += [
                    {"op": op, "pass": p, "batch": batch, "error": f"{type(exc).__name__}: {exc}"}
                    for p in ("fwd", "fwd+bwd")
                ]
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32

    print(
        f"\n{device_label}, {'x'.join(map(str, shape))} voxels, float32, median of {args.repeats} "
        f"after {args.warmup} warm-up; speed-up = ref ms / ours ms"
    )
    _print_table(rows, cuda)
    sweep = {}
    if sweep_blocks:
        for op in tqdm(OPS, desc="sweep", unit="op"):
            sweep[op] = _sweep_op(op, shape, device, args)
        _print_sweep(sweep)
    result = {
        **header("kernels", device_label),
        "shape": list(shape),
        "dtype": "float32",
        "tf32": False,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "batch_sizes": batches,
        "units": {
            "*_ms": "milliseconds, median",
            "shape": "voxels",
            "ours_TBps": "1e12 bytes/s of the fewest bytes",
            "launches": "Triton kernel launches per call",
            "block": "voxels per program",
        },
        "rows": rows,
        **({"sweep": sweep} if sweep else {}),
    }
    path = Path(args.out) / slug(device_label) / ("kernels-sweep.json" if sweep else "kernels.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")

    failed = [r for r in rows if "error" in r or r["check"] != "ok"]
    for r in failed:
        why = r.get("error") or (
            f"{r['mismatch_fraction']:.1e} of the elements differ from the reference by more "
            f"than {RTOL:.0e} x its largest magnitude (max |diff| {r['max_abs_diff']:.2e})"
        )
        print(f"FAILED: {r['op']} {r['pass']} B={r['batch']}: {why}", file=sys.stderr)
    wrong = [(op, c) for op, found in sweep.items() for c in found["configs"] if c.get("check") == "FAIL"]
    for op, c in wrong:
        print(f"FAILED: {op} at BLOCK {c['block']}, {c['num_warps']} warps differs from the reference", file=sys.stderr)
    return EXIT_FAILURE if failed or wrong else EXIT_OK
