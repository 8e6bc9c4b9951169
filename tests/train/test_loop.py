"""lumireg.train.loop: the objective learns, runs checkpoint and resume exactly, torchrun works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lumireg.network import LumiNet, read_checkpoint
from lumireg.train.data import random_crop, synthetic_pair
from lumireg.train.loop import RegistrationObjective, TrainConfig, train

TINY = dict(steps=4, crop=(32, 32, 32), checkpoint_every=2, log_every=1, workers=0)


def _fixed_crop(size=64):
    sample = synthetic_pair(7, labels=False)
    sample = random_crop(sample, (size, size, size), torch.Generator().manual_seed(3))
    return sample["fixed"][None], sample["moving"][None]


@pytest.mark.parametrize("similarity", ["ncc", "mi"])
def test_a_few_steps_lower_the_loss_on_a_fixed_pair(similarity):
    torch.manual_seed(0)
    fixed, moving = _fixed_crop()
    model = LumiNet()
    objective = RegistrationObjective(model, TrainConfig(similarity=similarity))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = objective(fixed, moving)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0] - 0.01, losses


def test_training_run_writes_checkpoint_weights_log_and_plot(tmp_path):
    model_path = train(TrainConfig(**TINY), tmp_path, command=["lumireg", "train", "test"])
    assert model_path == tmp_path / "model.pt"
    weights, checkpoint = read_checkpoint(model_path), read_checkpoint(tmp_path / "checkpoint.pt")
    assert weights["step"] == checkpoint["step"] == 4
    assert "optimizer" not in weights and "optimizer" in checkpoint
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["command"] == ["lumireg", "train", "test"]
    assert [row["step"] for row in log["log"]] == [1, 2, 3, 4]
    assert all(row["similarity"] < 0 for row in log["log"])
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    straight = read_checkpoint(train(TrainConfig(**TINY), tmp_path / "straight"))
    train(TrainConfig(**{**TINY, "steps": 2}), tmp_path / "split")
    resumed = read_checkpoint(
        train(TrainConfig(**TINY), tmp_path / "split", resume=tmp_path / "split" / "checkpoint.pt")
    )
    assert resumed["step"] == 4
    assert resumed["training"]["from_step"] == 2
    assert [c["from_step"] for c in resumed["training"]["earlier_commands"]] == [0]
    if not torch.cuda.is_available():
        for name, value in straight["model"].items():
            assert torch.allclose(resumed["model"][name], value, atol=1e-6), name
        return
    # On a GPU the kernels' atomic adds (and cuDNN's) let gradients differ in their last bits between runs; Adam
    # turns that into up to about lr per step only where a gradient is near 0. A resume that lost state moves all.
    got, want = (torch.cat([run["model"][name].flatten() for name in straight["model"]]) for run in (resumed, straight))
    off = ~torch.isclose(got, want, atol=1e-6)
    assert off.float().mean() <= 0.01 and (got - want).abs().max() <= 2 * TrainConfig().lr, f"{off.sum()} weights off"


def test_resume_from_weights_only_file_is_refused(tmp_path):
    train(TrainConfig(**{**TINY, "steps": 1}), tmp_path)
    with pytest.raises(ValueError, match="weights only"):
        train(TrainConfig(**TINY), tmp_path / "again", resume=tmp_path / "model.pt")


def test_torchrun_with_two_cpu_processes_trains_one_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lumireg",
        "train",
        "--steps",
        "2",
        "--crop",
        "32,32,32",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["world_size"] == 2 and [row["step"] for row in log["log"]] == [1, 2]
    assert read_checkpoint(tmp_path / "model.pt")["step"] == 2


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--data", "missing/dataset.json"], "missing/dataset.json"),
        (["--data", "images/"], "LUMIR dataset JSON"),
        (["--crop", "30,32,32"], "multiples of 16"),
        (["--steps", "0"], ">= 1"),
    ],
)
def test_train_command_reports_bad_arguments_clearly(tmp_path, arguments, message):
    lumireg = str(Path(sys.executable).parent / "lumireg")
    done = subprocess.run(
        [lumireg, "train", "--out", str(tmp_path), "--workers", "0", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_init_starts_from_the_given_weights_and_resume_wins_over_it(tmp_path):
    train(TrainConfig(**{**TINY, "steps": 1}), tmp_path / "first")
    start = read_checkpoint(tmp_path / "first" / "model.pt")
    config = TrainConfig(**{**TINY, "steps": 1, "lr": 0.0, "init": str(tmp_path / "first" / "model.pt")})
    tuned = read_checkpoint(train(config, tmp_path / "tuned"))
    for name, value in start["model"].items():  # lr 0: the weights are the initial ones, exactly
        assert torch.equal(tuned["model"][name], value), name
    fresh = read_checkpoint(train(TrainConfig(**{**TINY, "steps": 1, "lr": 0.0, "seed": 1}), tmp_path / "fresh"))
    assert not torch.equal(fresh["model"]["head.weight"], start["model"]["head.weight"])


def test_unknown_synthetic_preset_is_refused():
    with pytest.raises(ValueError, match="broad"):
        TrainConfig(synthetic="wide")
