"""The accuracy benchmark harness, end to end on two small held-out pairs, SyN included."""

import json

from lumireg.cli import build_parser
from lumireg.network import LumiNet, save_checkpoint


def test_accuracy_benchmark_scores_every_method_and_writes_table_and_figure(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "untrained.pt", LumiNet())
    args = build_parser().parse_args(
        ["bench", "--accuracy", "--pairs", "2", "--shape", "48,64,48", "--checkpoint", str(checkpoint),
         "--out", str(tmp_path / "results")]
    )
    assert args.func(args) == 0
    (folder,) = (tmp_path / "results").iterdir()
    table = json.loads((folder / "accuracy.json").read_text())["methods"]
    assert set(table) == {"none", "syn", "lumireg"}
    for method, entry in table.items():
        assert entry["pairs"] == 2 and entry["shape"] == [48, 64, 48]
        assert 0.0 < entry["summary"]["dice"]["mean"] <= 1.0
        assert entry["summary"]["seconds"]["mean"] >= 0.0
    # an untrained network starts at the identity: it scores as no registration does
    assert abs(table["lumireg"]["summary"]["dice"]["mean"] - table["none"]["summary"]["dice"]["mean"]) < 1e-3
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


def test_accuracy_benchmark_refuses_unknown_method(tmp_path, capsys):
    args = build_parser().parse_args(["bench", "--accuracy", "--methods", "none,elastix", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "--methods" in capsys.readouterr().err
