"""The accuracy benchmark harness, end to end on two small held-out pairs, SyN included."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lumireg.cli import build_parser
from lumireg.contract import EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_USAGE, request_parameters


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc/self/stat's start time, in clock ticks since boot)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def test_accuracy_benchmark_scores_every_method_and_writes_table_and_figure(accuracy_run):
    assert accuracy_run.code == EXIT_OK, accuracy_run.stderr
    folder = accuracy_run.folder
    sets = json.loads((folder / "accuracy.json").read_text())["sets"]
    assert list(sets) == ["synthetic", "independent", "contrast"]  # every set by default
    assert [entries["labels"] for entries in sets.values()] == [24, 54, 54]
    assert [sorted(entries["methods"]) for entries in sets.values()] == [
        [
            "lumireg",
            "lumireg-1pass",
            "lumireg-2passes",
            "lumireg-contrast",
            "lumireg-contrast-refine-mi",
            "lumireg-refine",
            "lumireg-refine-mi",
            "none",
            "syn",
        ]
    ] * 3
    assert sets["independent"]["methods"]["none"]["pairs"] == 2
    table = sets["synthetic"]["methods"]
    for entry in table.values():
        assert entry["pairs"] == 2 and entry["shape"] == [48, 64, 48]
        assert 0.0 < entry["summary"]["dice"]["mean"] <= 1.0
    # seconds per pair: the summary is the rows' statistics, and the rows are real elapsed times, each pair
    # timed on its own: together they fit into this process's life (the run is in process), and returning
    # zeros ("none") costs a small fraction of a SyN registration
    timed = []
    for set_name, entries in sets.items():
        for method, entry in entries["methods"].items():
            name = f"accuracy-{method}.json" if set_name == "synthetic" else f"accuracy-{set_name}-{method}.json"
            seconds = [row["seconds"] for row in json.loads((folder / name).read_text())["rows"]]
            assert len(seconds) == entry["pairs"] and min(seconds) > 0, (set_name, method, seconds)
            assert entry["summary"]["seconds"]["mean"] == pytest.approx(np.mean(seconds), rel=1e-12)
            assert entry["summary"]["seconds"]["std"] == pytest.approx(np.std(seconds), rel=1e-9, abs=1e-12)
            timed += seconds
        summary = {method: entry["summary"]["seconds"]["mean"] for method, entry in entries["methods"].items()}
        assert summary["none"] < 0.01 * summary["syn"], (set_name, summary)
    assert sum(timed) < _process_age(), (sum(timed), _process_age())
    # an untrained network starts at the identity: it scores as no registration does, TRE included
    for method in ("lumireg", "lumireg-1pass", "lumireg-2passes"):
        assert abs(table[method]["summary"]["dice"]["mean"] - table["none"]["summary"]["dice"]["mean"]) < 1e-3
        assert abs(table[method]["summary"]["tre"]["mean"] - table["none"]["summary"]["tre"]["mean"]) < 1e-2
    # every set and method scores TRE at the template's landmarks (tests/benchmarks/test_landmarks.py: its meaning)
    for entries in sets.values():
        assert all(0 < entry["summary"]["tre"]["mean"] < 10 for entry in entries["methods"].values()), entries
    assert "TRE vox" in accuracy_run.stdout
    requests = {method: table[method]["request"] for method in table if method.startswith("lumireg")}
    given = {  # the rest at the contract's defaults
        "lumireg": {"passes": 1},
        "lumireg-1pass": {"passes": 1, "coarse": 0},
        "lumireg-2passes": {"passes": 2},
        "lumireg-refine": {"refine": 3, "similarity": "ncc"},
        "lumireg-refine-mi": {"refine": 3, "similarity": "mi"},
        "lumireg-contrast": {"contrast": "other"},
        "lumireg-contrast-refine-mi": {"refine": 3, "similarity": "mi", "contrast": "other"},
    }
    assert requests == {method: request_parameters(parameters) for method, parameters in given.items()}
    assert (folder / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_syn_displacement_is_read_back_in_lumireg_convention():
    import torch

    from lumireg.benchmarks.accuracy import _register_syn
    from lumireg.kernels import warp
    from lumireg.train.data import SyntheticPairs, evaluation_seeds

    sample = SyntheticPairs(evaluation_seeds(1), shape=(48, 64, 48), split="eval", labels=False)[0]
    fixed, moving = sample["fixed"][0].numpy(), sample["moving"][0].numpy()
    disp = _register_syn(fixed, moving, None)
    assert disp.shape == (3, 48, 64, 48) and abs(disp).max() > 0.1
    warped = warp(sample["moving"][None], torch.from_numpy(disp)[None])[0, 0].numpy()
    # read in the wrong convention (sign or axis order), the field would not bring moving onto fixed
    assert abs(fixed - warped).mean() < 0.85 * abs(fixed - moving).mean()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--methods", "none,elastix"),
        ("--pairs", "0"),
        ("--shape", "48,64"),
        ("--sets", "synthetic,octants"),
        ("--refine-steps", "1000"),
    ],
)
def test_accuracy_benchmark_refuses_bad_options(tmp_path, capsys, option, value):
    args = build_parser().parse_args(["bench", "accuracy", option, value, "--out", str(tmp_path)])
    assert args.func(args) == EXIT_USAGE
    assert option in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_accuracy_benchmark_refuses_the_pose_set_off_lumirs_canvas(tmp_path, capsys):
    argv = ["bench", "accuracy", "--sets", "pose", "--shape", "48,64,48", "--out", str(tmp_path)]
    args = build_parser().parse_args(argv)
    assert args.func(args) == EXIT_USAGE
    assert "canvas" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_accuracy_benchmark_reads_method_files_written_before_the_common_header(accuracy_run, tmp_path):
    folder = tmp_path / accuracy_run.folder.name
    folder.mkdir()
    old = json.loads((accuracy_run.folder / "accuracy-syn.json").read_text())
    old = {
        "method": "syn",
        "device": old["device"],
        "lumireg_commit": "0123abc",
        "checkpoint": None,
        "shape": old["shape"],
        "pairs": old["pairs"],
        "summary": old["summary"],
        "rows": old["rows"],
    }
    (folder / "accuracy-syn.json").write_text(json.dumps(old))
    args = build_parser().parse_args(
        ["bench", "accuracy", "--methods", "none", "--pairs", "1", "--shape", "48,64,48", "--out", str(tmp_path)]
    )
    assert args.func(args) == EXIT_OK
    table = json.loads((folder / "accuracy.json").read_text())["sets"]["synthetic"]["methods"]
    assert set(table) == {"none", "syn"} and table["syn"]["commit"] == "0123abc" and table["syn"]["date"] is None
    assert table["syn"]["summary"] == old["summary"]


def test_accuracy_benchmark_without_antspyx_says_so_for_syn(tmp_path, monkeypatch, capsys):
    from lumireg.benchmarks import accuracy

    monkeypatch.setattr(accuracy, "find_spec", lambda name: None if name == "ants" else object())
    args = build_parser().parse_args(["bench", "accuracy", "--methods", "none,syn", "--out", str(tmp_path)])
    assert args.func(args) == EXIT_MISSING_DEPENDENCY
    assert "antspyx" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_accuracy_benchmark_scores_the_independent_set_alone(tmp_path, capsys):
    args = build_parser().parse_args(
        [
            "bench",
            "accuracy",
            "--sets",
            "independent",
            "--methods",
            "none",
            "--pairs",
            "1",
            "--shape",
            "32,40,36",
            "--out",
            str(tmp_path),
        ]
    )
    assert args.func(args) == EXIT_OK
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["accuracy-independent-none.json", "accuracy.json"]
    sets = json.loads((folder / "accuracy.json").read_text())["sets"]
    assert list(sets) == ["independent"] and list(sets["independent"]["methods"]) == ["none"]
    entry = sets["independent"]["methods"]["none"]
    assert entry["pairs"] == 1 and entry["shape"] == [32, 40, 36]
    # the two images have independent deformations: unregistered labels overlap only partly
    assert 0.2 < entry["summary"]["dice"]["mean"] < 0.95
    rows = json.loads((folder / "accuracy-independent-none.json").read_text())
    assert rows["set"] == "independent" and rows["rows"][0]["seed"] == 0
    printed = capsys.readouterr().out.splitlines()
    (line,) = [row for row in printed if row.startswith("independent")]
    assert line.split()[1:3] == ["none", "1"]
