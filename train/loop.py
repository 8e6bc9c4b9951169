"""Unsupervised training of :class:`LumiNet`: ``lumireg train``.

One step: predict the velocity ``v`` of a (fixed, moving) pair, integrate
``v`` and ``-v``, warp moving onto fixed and fixed onto moving, and minimise

    similarity(F, M o phi) / 2 + similarity(M, F o phi^-1) / 2 + smooth_weight * |grad v|^2

with similarity ``-local_ncc`` (window :data:`lumireg.contract.NCC_WINDOW`) or ``-MI`` for cross-contrast data.
Inverse consistency holds by construction (``v`` is antisymmetric), so it
needs no loss term. Runs on one CPU or GPU, or on several processes with
``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPUs); mixed
precision (bfloat16) for the network on CUDA.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lumireg.contract import NCC_WINDOW, check_size_multiple
from lumireg.kernels import warp
from lumireg.network import LumiNet, NetworkConfig, read_checkpoint, save_checkpoint, velocity_to_displacement
from lumireg.network.refine import smoothness
from lumireg.train.losses import mi_loss, ncc_loss


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in its checkpoints and log.

    ``data``: ``"synthetic"`` (pairs made from the bundled MNI template) or the
    path of a LUMIR dataset JSON. ``crop``: training window in voxels (each a
    multiple of 16), cut from full-canvas pairs so the network sees images at
    their true 1 mm scale; ``crops_per_pair`` windows are cut from each pair
    before the next is made (making a pair costs about as much as a step on a
    CPU). ``steps`` counts optimiser steps; one step sees ``batch_size`` crops
    on every process. ``synthetic``: the name of the pair distribution
    (:data:`lumireg.train.synthetic.PRESETS`) when ``data`` is synthetic.
    ``init``: a checkpoint whose weights start the run (fine-tuning), instead
    of a fresh initialisation; its network config is used.
    """

    data: str = "synthetic"
    synthetic: str = "lumir"
    init: str | None = None
    steps: int = 2000
    batch_size: int = 1
    crop: tuple[int, int, int] = (96, 96, 96)
    crops_per_pair: int = 2
    lr: float = 1e-3
    similarity: str = "ncc"
    ncc_window: int = NCC_WINDOW
    smooth_weight: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    workers: int = 1
    amp: bool = True
    network: dict = field(default_factory=lambda: NetworkConfig().to_dict())

    def __post_init__(self):
        self.crop = tuple(self.crop)
        from lumireg.train.synthetic import PRESETS

        if self.synthetic not in PRESETS:
            raise ValueError(f"synthetic must be one of {sorted(PRESETS)}, got {self.synthetic!r}")
        if self.similarity not in ("ncc", "mi"):
            raise ValueError(f"similarity must be 'ncc' or 'mi', got {self.similarity!r}")
        if len(self.crop) != 3:
            raise ValueError(f"crop must be three sizes (D, H, W), got {self.crop}")
        check_size_multiple(self.crop, "crop")
        if min(self.steps, self.batch_size, self.crops_per_pair, self.checkpoint_every, self.log_every) < 1:
            raise ValueError("steps, batch_size, crops_per_pair, checkpoint_every and log_every must be >= 1")


class RegistrationObjective(torch.nn.Module):
    """The training loss as a module, so DistributedDataParallel wraps the whole step."""

    def __init__(self, model: LumiNet, config: TrainConfig):
        super().__init__()
        self.model, self.config = model, config

    def similarity(self, target: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        if self.config.similarity == "mi":
            return mi_loss(target, warped)
        return ncc_loss(target, warped, self.config.ncc_window)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        amp = self.config.amp and fixed.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            velocity = self.model.velocity(fixed, moving)
        velocity = velocity.float()  # integration and warping accumulate in float32
        steps = self.model.config.steps
        forward, inverse = velocity_to_displacement(velocity, steps), velocity_to_displacement(-velocity, steps)
        sim = 0.5 * (self.similarity(fixed, warp(moving, forward)) + self.similarity(moving, warp(fixed, inverse)))
        smooth = smoothness(velocity)
        loss = sim + self.config.smooth_weight * smooth
        return {"loss": loss.mean(), "similarity": sim.mean().detach(), "smoothness": smooth.mean().detach()}


class _TrainingSamples(Dataset):
    """Sample ``i`` of this process: a window of pair ``index // crops_per_pair`` of ``source``."""

    def __init__(self, source, config: TrainConfig, rank: int, world: int, first_step: int):
        self.source, self.config, self.rank, self.world = source, config, rank, world
        self.first = first_step * config.batch_size
        self.length = (config.steps - first_step) * config.batch_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        from lumireg.train.data import random_crop

        # global sample index: every process and every step draws different pairs, reproducibly
        step, slot = divmod(self.first + i, self.config.batch_size)
        index = (step * self.world + self.rank) * self.config.batch_size + slot
        sample = self.source[index // self.config.crops_per_pair]
        crop_rng = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        sample = random_crop(sample, self.config.crop, crop_rng)
        return {"fixed": sample["fixed"], "moving": sample["moving"]}


def _data_source(config: TrainConfig):
    """Indexable pairs: sample k of the run is ``source[k]``."""
    from lumireg.train import data

    if config.data == "synthetic":
        seeds = data.training_seeds(10**9, start=config.seed * 10**9)
        return data.SyntheticPairs(seeds, config=data.PRESETS[config.synthetic], split="train", labels=False)
    path = Path(config.data)
    if path.suffix != ".json":
        raise ValueError(f"--data must be 'synthetic' or a LUMIR dataset JSON file, got {config.data!r}")
    return data.LumirPairs(path, split="training", seed=config.seed, length=10**9)


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _plot_loss(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in ("loss", "similarity"):
        ax.plot(steps, [r[key] for r in log], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (-NCC or -MI, + smoothness)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["smoothness"] for r in log], color="tab:green", alpha=0.6, label="smoothness")
    ax2.set_ylabel("smoothness |grad v|^2 (voxels^2 / voxel^2)")
    fig.legend(loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.93), fontsize=8)
    ax.set_title("lumireg training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(
    config: TrainConfig,
    out: str | Path,
    resume: str | Path | None = None,
    device: str = "auto",
    command: list[str] | None = None,
) -> Path:
    """Train; returns ``out/model.pt``, the trained weights (a checkpoint without optimiser state).

    Writes ``out/checkpoint.pt`` (model, optimiser, step, log) every
    ``checkpoint_every`` steps, ``out/log.json`` (command, config, per-step
    losses) and ``out/loss.png``. ``resume``: a ``checkpoint.pt`` to continue
    from; the data stream goes on where it stopped, so a resumed run sees the
    same pairs as an uninterrupted one.
    """
    rank, world = _distributed()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
        torch.cuda.set_device(dev)
    out = Path(out)
    torch.manual_seed(config.seed)
    initial = read_checkpoint(config.init) if config.init is not None and resume is None else None
    if initial is not None:
        config.network = initial["network"]
    model = LumiNet(NetworkConfig.from_dict(config.network)).to(dev)
    if initial is not None:
        model.load_state_dict(initial["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    first_step, log, earlier = 0, [], []
    if resume is not None:
        state = read_checkpoint(resume)
        if "optimizer" not in state:
            raise ValueError(f"{resume} holds weights only, not a training state to resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        previous = state.get("training", {})
        first_step, log = state["step"], list(previous.get("log", []))
        # the commands that made this run so far, each with the step it started from
        earlier = [
            *previous.get("earlier_commands", []),
            {"command": previous.get("command"), "from_step": previous.get("from_step", 0)},
        ]
        if first_step >= config.steps:
            raise ValueError(f"{resume} is at step {first_step}; ask for more --steps than that to go on")
    objective = RegistrationObjective(model, config)
    if world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    samples = _TrainingSamples(_data_source(config), config, rank, world, first_step)
    loader = DataLoader(
        samples,
        batch_size=config.batch_size,
        num_workers=config.workers,
        worker_init_fn=_single_thread_worker,
        persistent_workers=config.workers > 0,
    )
    meta = {
        "command": command or sys.argv,
        "from_step": first_step,
        "earlier_commands": earlier,
        "config": asdict(config),
        "world_size": world,
        "device": str(dev),
    }

    def checkpoint(step: int) -> Path:
        training = {**meta, "log": log}
        return save_checkpoint(out / "checkpoint.pt", model, step, optimizer=optimizer.state_dict(), training=training)

    model.train()
    started, step, window = time.perf_counter(), first_step, []
    bar = tqdm(loader, total=config.steps, initial=first_step, desc="train", unit="step", disable=rank != 0)
    for batch in bar:
        fixed, moving = batch["fixed"].to(dev), batch["moving"].to(dev)
        terms = objective(fixed, moving)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        step += 1
        window.append({k: float(v.detach()) for k, v in terms.items()})
        if rank == 0 and (step % config.log_every == 0 or step == config.steps):
            # each row holds the mean over the steps since the last row
            means = {k: round(sum(w[k] for w in window) / len(window), 6) for k in window[0]}
            row = {"step": step, **means, "seconds": round(time.perf_counter() - started, 1)}
            log.append(row)
            window = []
            bar.set_postfix(loss=f"{row['loss']:.4f}", sim=f"{row['similarity']:.4f}")
        if rank == 0 and (step % config.checkpoint_every == 0 or step == config.steps):
            checkpoint(step)
            (out / "log.json").write_text(json.dumps({**meta, "log": log}, indent=1) + "\n")
            if log:
                _plot_loss(log, out / "loss.png")
    if rank == 0:
        save_checkpoint(out / "model.pt", model, step, training={**meta, "final": log[-1] if log else None})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out / "model.pt"


def _single_thread_worker(_worker_id: int) -> None:
    # the main process already uses every core for the step; a data worker needs just one
    torch.set_num_threads(1)
