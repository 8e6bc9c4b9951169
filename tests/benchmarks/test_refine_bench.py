"""``lumireg bench refine``: per-step cost and refined requests, on a small pair."""

import json

from lumireg.cli import build_parser
from lumireg.contract import EXIT_OK, EXIT_USAGE


def test_refine_benchmark_times_steps_and_requests(refine_run):
    assert refine_run.code == EXIT_OK, refine_run.stderr
    result = json.loads((refine_run.folder / "refine.json").read_text())
    assert result["shape"] == [32, 48, 32] and result["batch"] == 1
    assert set(result["per_step_seconds"]) == {"ncc", "mi"}
    assert all(seconds >= 0 for seconds in result["per_step_seconds"].values())
    requests = result["request_seconds"]
    assert list(requests) == ["0", "1", "3"] and all(seconds > 0 for seconds in requests.values())
    assert "one refinement step, ncc" in refine_run.stdout


def test_refine_benchmark_refuses_bad_options(tmp_path, capsys):
    for option, value in (("--steps", "0"), ("--steps", "500"), ("--similarities", "ssd"), ("--shape", "30,48,32")):
        args = build_parser().parse_args(["bench", "refine", option, value, "--out", str(tmp_path)])
        assert args.func(args) == EXIT_USAGE, option
        assert capsys.readouterr().err.startswith("lumireg bench refine:")
    assert not list(tmp_path.iterdir())
