"""The checkpoint format: one ``torch.save`` file of plain dicts and tensors, no pickled classes.

Keys: ``format`` ("lumireg-checkpoint"), ``version`` (1), ``network`` (the
:class:`NetworkConfig` as a dict), ``model`` (the state dict), ``step`` (training
steps done) and, in training checkpoints only, ``optimizer`` and ``training``
(the training config and log position). Files load with
``torch.load(weights_only=True)``, so a checkpoint can never run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lumireg.network.model import LumiNet, NetworkConfig

FORMAT, VERSION = "lumireg-checkpoint", 1
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "lumireg-default.pt"


def save_checkpoint(path: str | Path, model: LumiNet, step: int = 0, **extra) -> Path:
    """Write ``model`` (its config and weights), ``step`` and ``extra`` entries to ``path``, atomically."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {
        "format": FORMAT,
        "version": VERSION,
        "network": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "step": int(step),
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)  # a crash mid-write never leaves a truncated checkpoint behind
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict (tensors on CPU); ``ValueError`` naming the path if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a lumireg checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lumireg checkpoint (no format={FORMAT!r} entry)")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} is checkpoint version {state.get('version')}; this lumireg reads {VERSION}")
    return state


def load_model(path: str | Path | None = None) -> LumiNet:
    """Rebuild the network from a checkpoint (default: the bundled weights), in eval mode on CPU."""
    state = read_checkpoint(DEFAULT_WEIGHTS if path is None else path)
    model = LumiNet(NetworkConfig.from_dict(state["network"]))
    model.load_state_dict(state["model"])
    return model.eval()
