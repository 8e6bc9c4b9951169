"""lumireg.kernels._dispatch.launch: every kernel runs on its tensors' GPU, sized from LAUNCH, counted.

Without a GPU the CUDA device guard is observed through a stand-in for
``torch.cuda.device`` and a tensor that says it lives on ``cuda:1``.
"""

import contextlib
import importlib
import inspect
import re

import pytest
import torch

from lumireg.kernels import _dispatch, integrate, local_ncc, mutual_information, warp

# the package's names warp, integrate, mutual_information are the ops, not their modules
MODULES = [importlib.import_module(f"lumireg.kernels.{m}") for m in ("warp", "integrate", "ncc", "mutual_information")]
KERNELS = {name for m in MODULES for name, v in vars(m).items() if name.endswith("_kernel") and hasattr(v, "arg_names")}


class OnSecondGpu(torch.Tensor):
    """A CPU tensor that reports ``cuda:1``, as an input on a second GPU would."""

    is_cuda = property(lambda self: True)
    device = property(lambda self: torch.device("cuda", 1))


@pytest.fixture
def current_device(monkeypatch):
    """A stand-in for ``torch.cuda.device``: the stack of devices made current (``[]`` outside any)."""
    stack = []

    @contextlib.contextmanager
    def device(where):
        stack.append(torch.device(where))
        try:
            yield
        finally:
            stack.pop()

    monkeypatch.setattr(_dispatch.torch.cuda, "device", device)
    return stack


def test_launch_makes_the_tensors_gpu_current_and_counts(current_device):
    seen = []

    class Kernel:
        __name__ = "_probe_kernel"

        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((list(current_device), grid, meta))

    _dispatch.launches.clear()
    _dispatch.launch(Kernel(), (3, 1), 7, torch.empty(2).as_subclass(OnSecondGpu), BLOCK=256)
    assert seen == [([torch.device("cuda", 1)], (3, 1), {"BLOCK": 256})]
    assert current_device == [] and _dispatch.launches == {"_probe_kernel": 1}


def test_device_guard_on_cpu_tensors_touches_no_cuda_device(current_device):
    with _dispatch.device_guard(torch.empty(2)):
        assert current_device == []


def test_no_kernel_is_launched_except_through_launch():
    for module in MODULES:
        assert not re.search(r"_kernel\[", inspect.getsource(module)), module.__name__


# sizes unlike the defaults, so that a launch sized from anything but LAUNCH shows; results still match the twins
OTHER_SIZES = {"warp": (256, 2), "integrate": (512, 8), "local_ncc": (256, 8), "mutual_information": (64, 2)}


def test_every_launch_runs_inside_the_device_guard_sized_from_its_ops_entry(monkeypatch, rng, oracle):
    for op, size in OTHER_SIZES.items():
        monkeypatch.setitem(_dispatch.LAUNCH, op, _dispatch.Launch(*size))
    inside, launched = [], []
    real_guard = _dispatch.device_guard

    @contextlib.contextmanager
    def guard(tensor):
        with real_guard(tensor):
            inside.append(tensor.device)
            yield
            inside.pop()

    monkeypatch.setattr(_dispatch, "device_guard", guard)
    for kernel_type in {type(getattr(m, k)) for m in MODULES for k in vars(m) if k in KERNELS}:
        run = kernel_type.run

        def recording_run(self, *args, run=run, **meta):
            launched.append((self.__name__, list(inside), meta["BLOCK"], meta["num_warps"]))
            return run(self, *args, **meta)

        monkeypatch.setattr(kernel_type, "run", recording_run)

    size = (6, 7, 8)  # 336 voxels: 2 programs of 256, or 6 of 64
    image = torch.rand(2, 1, *size, generator=rng, dtype=torch.float64)
    other = torch.rand(2, 1, *size, generator=rng, dtype=torch.float64)
    disp = 2 * torch.randn(2, 3, *size, generator=rng, dtype=torch.float64)
    ops = {
        "warp": lambda backend, a, b, d: warp(a, d, backend=backend),
        "integrate": lambda backend, a, b, d: integrate(d, steps=3, backend=backend),
        "local_ncc": lambda backend, a, b, d: local_ncc(a, b, window=3, backend=backend),
        "mutual_information": lambda backend, a, b, d: mutual_information(a, b, bins=16, backend=backend),
    }
    names = set()
    for op, fn in ops.items():
        launched.clear()
        results = []
        for backend in ("triton", "torch"):
            inputs = [t.clone().requires_grad_() for t in (image, other, disp)]
            out = fn(backend, *inputs)
            grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
            results.append([out, *[g for g in grads if g is not None]])
        for got, want in zip(*results):
            assert oracle.rel_err(got.detach(), want.detach()) < 1e-10, op
        assert launched and all(where == [torch.device("cpu")] for _, where, _, _ in launched), launched
        assert {(block, warps) for _, _, block, warps in launched} == {OTHER_SIZES[op]}, op
        names |= {name for name, *_ in launched}
    assert names == KERNELS


# `lumireg bench kernels --sweep-blocks` times the LAUNCH alternatives (its other tests: tests/benchmarks)


def test_block_sweep_on_a_host_without_gpu_says_it_needs_one(tmp_path, monkeypatch, capsys):
    from lumireg.benchmarks import kernels as bench
    from lumireg.cli import build_parser
    from lumireg.contract import EXIT_MISSING_DEPENDENCY

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    args = build_parser().parse_args(["bench", "kernels", "--sweep-blocks", "--out", str(tmp_path)])
    assert args.func(args) == EXIT_MISSING_DEPENDENCY
    assert "needs a GPU" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_block_sweep_checks_and_times_every_size_and_keeps_the_default(monkeypatch):
    import types

    from lumireg.benchmarks import kernels as bench

    def on_triton(image, disp, backend="auto"):  # the benchmark's "auto" would run the twin on a CPU
        return warp(image, disp, backend="triton")

    # the Triton path under the interpreter, timed by a stand-in clock that prefers 512 voxels x 8 warps
    monkeypatch.setattr(bench, "kernels", types.SimpleNamespace(warp=on_triton))
    clock = {(512, 8): 1.0}
    monkeypatch.setattr(bench, "_median_ms", lambda *_: clock.get(tuple(_dispatch.LAUNCH["warp"]), 2.0))
    default = _dispatch.LAUNCH["warp"]
    found = bench._sweep_op("warp", (6, 7, 8), torch.device("cpu"), types.SimpleNamespace(warmup=0, repeats=1))
    sizes = [(c["block"], c["num_warps"]) for c in found["configs"]]
    assert sizes == [(b, w) for b in bench.SWEEP_BLOCKS["warp"] for w in bench.SWEEP_WARPS]
    assert all(c["check"] == "ok" for c in found["configs"]), found["configs"]
    assert found["best"] == {"block": 512, "num_warps": 8, "check": "ok", "fwd_ms": 1.0, "fwd+bwd_ms": 1.0}
    assert _dispatch.LAUNCH["warp"] is default and found["default"] == default._asdict()


def test_kernel_benchmark_reports_seven_launches_forward_and_fourteen_forward_backward_for_integrate(monkeypatch):
    import types

    from lumireg.benchmarks import kernels as bench

    def on_triton(velocity, steps, backend="auto"):  # the benchmark's "auto" would run the twin on a CPU
        return integrate(velocity, steps, backend="triton")

    monkeypatch.setattr(bench, "kernels", types.SimpleNamespace(integrate=on_triton))
    monkeypatch.setattr(bench, "use_triton", lambda backend, tensor: True)
    monkeypatch.setattr(bench, "_median_ms", lambda *_: 1.0)
    rows = bench._run_case("integrate", (6, 7, 8), 1, torch.device("cpu"), types.SimpleNamespace(warmup=0, repeats=1))
    assert [(r["pass"], r["launches"], r["check"]) for r in rows] == [("fwd", 7, "ok"), ("fwd+bwd", 14, "ok")]
