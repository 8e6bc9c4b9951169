"""``lumireg bench align``: the alignment stage's cost and accuracy on posed brains, on a small volume."""

import json

import pytest

from lumireg.cli import build_parser
from lumireg.contract import EXIT_OK, EXIT_USAGE


@pytest.fixture(scope="module")
def align_run(bench):
    """One posed 64 x 80 x 64 brain, rigid with NCC, on the CPU."""
    return bench("align", "--shape", "64,80,64", "--poses", "1", "--modes", "rigid", "--similarities", "ncc")


def test_align_benchmark_times_the_stage_and_scores_the_corners(align_run):
    assert align_run.code == EXIT_OK, align_run.stderr
    result = json.loads((align_run.folder / "align.json").read_text())
    assert result["benchmark"] == "align" and result["shape"] == [64, 80, 64] and result["batch"] == 1
    row = result["results"]["rigid-ncc"]
    assert row["seconds"] > 0 and row["corner_error_mm"]["mean"] >= 0 and 0 <= row["converged"] <= 1
    assert "rigid-ncc:" in align_run.stdout


def test_align_benchmark_refuses_bad_options(tmp_path, capsys):
    for option, value in (("--modes", "none"), ("--similarities", "ssd"), ("--poses", "0"), ("--shape", "30,48,32")):
        args = build_parser().parse_args(["bench", "align", option, value, "--out", str(tmp_path)])
        assert args.func(args) == EXIT_USAGE, option
        assert capsys.readouterr().err.startswith("lumireg bench align:")
    assert not list(tmp_path.iterdir())
