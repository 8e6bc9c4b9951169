"""The kernel benchmark harness runs end to end on a tiny volume and reports what it measured."""

import json

from lumireg.cli import build_parser
from lumireg.contract import EXIT_MISSING_DEPENDENCY, EXIT_OK


def test_kernel_benchmark_checks_every_op_and_writes_json(kernels_run):
    assert kernels_run.code == EXIT_OK, kernels_run.stderr
    result = json.loads((kernels_run.folder / "kernels.json").read_text())
    assert result["shape"] == [6, 7, 8] and result["batch_sizes"] == [1, 2]
    rows = result["rows"]
    assert {(r["op"], r["pass"], r["batch"]) for r in rows} == {
        (op, p, b)
        for op in ("warp", "integrate", "local_ncc", "mutual_information")
        for p in ("fwd", "fwd+bwd")
        for b in (1, 2)
    }
    for row in rows:
        assert row["check"] == "ok" and row["path"] == "torch-twin"
        assert row["ours_ms"] > 0 and row["ref_ms"] > 0


def test_kernel_benchmark_picks_cpu_defaults_when_unset(tmp_path, monkeypatch):
    from lumireg.benchmarks import kernels

    cases = []

    def record_case(op, shape, batch, device, args):
        cases.append((shape, batch))
        return []

    monkeypatch.setattr(kernels, "_run_case", record_case)
    args = build_parser().parse_args(["bench", "kernels", "--device", "cpu", "--out", str(tmp_path)])
    kernels.run(args)
    assert (args.shape, args.batch_sizes, args.warmup, args.repeats) == ("80,112,96", "1", 1, 3)
    assert set(cases) == {((80, 112, 96), 1)}


def test_kernel_benchmark_on_cuda_without_a_gpu_is_a_missing_dependency(tmp_path, monkeypatch, capsys):
    from lumireg.benchmarks import kernels

    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: False)
    args = build_parser().parse_args(["bench", "kernels", "--device", "cuda", "--out", str(tmp_path)])
    assert args.func(args) == EXIT_MISSING_DEPENDENCY
    assert "no CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())
