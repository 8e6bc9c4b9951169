"""The registration network, its checkpoint format and the bundled default weights."""

from lumireg.network.checkpoint import DEFAULT_WEIGHTS, load_model, read_checkpoint, save_checkpoint
from lumireg.network.model import LumiNet, NetworkConfig, velocity_to_displacement

__all__ = [
    "LumiNet",
    "NetworkConfig",
    "velocity_to_displacement",
    "save_checkpoint",
    "read_checkpoint",
    "load_model",
    "DEFAULT_WEIGHTS",
]
