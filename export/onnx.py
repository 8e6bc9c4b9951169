"""Checkpoint -> ONNX of the network part, with the parity check that runs after every export.

The exported graph is what the service's ``lumireg_network`` model runs:

- inputs ``fixed``, ``moving``: ``uint8 [B, 1, D, H, W]``, e.g. 160 x 224 x 192 (LUMIR's
  intensities 0..255; the graph divides by 255 itself, so the wire and the
  hand-over between the server's models stay 8-bit);
- output ``velocity``: ``float32 [B, 3, D/2, H/2, W/2]``, the stationary
  velocity at half resolution in half-resolution voxel units
  (:meth:`LumiNet.velocity`); integration and warping stay in our Triton
  kernels, because ONNX has no 5-D grid sample before opset 20.

The batch and the spatial axes are dynamic: the service runs the graph on the
canvas and, for its coarse pass, on the pair halved (80 x 112 x 96); any
sizes that are multiples of 16 work. The parity check runs at both
(:data:`lumireg.contract.NETWORK_SHAPES`). Opset 17
(:data:`OPSET`): ONNX Runtime 1.31 and TensorRT 10 both run it. The graph is
written by the TorchScript exporter (``dynamo=False``), which needs no extra
package.
"""

from __future__ import annotations

import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from lumireg.contract import CANVAS, NETWORK_INPUT_NAMES, NETWORK_OUTPUT_NAME, NETWORK_SHAPES, PARITY_PAIR_FILE
from lumireg.network.model import LumiNet

OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |ONNX - PyTorch| on the velocity, fp32, half-resolution voxels


class VelocityGraph(torch.nn.Module):
    """``uint8`` image pair -> half-resolution velocity: the part of :class:`LumiNet` that is exported."""

    def __init__(self, model: LumiNet):
        super().__init__()
        self.model = model

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.model.velocity(fixed.float() / 255.0, moving.float() / 255.0)


def export_onnx(model: LumiNet, path: str | Path, shape: tuple[int, int, int] = CANVAS) -> Path:
    """Write the velocity graph of ``model`` to ``path`` (atomically), traced at ``shape``; batch and spatial axes
    stay dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, 1, *shape), dtype=torch.uint8)
    partial = path.with_name(path.name + ".partial")
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        # the exporter warns about the deprecation of TorchScript and about our shape checks, traced as constants
        warnings.simplefilter("ignore")
        torch.onnx.export(
            VelocityGraph(model.eval()),
            (example, example),
            str(partial),
            input_names=list(NETWORK_INPUT_NAMES),
            output_names=[NETWORK_OUTPUT_NAME],
            dynamic_axes={name: axes for name in NETWORK_INPUT_NAMES}
            | {NETWORK_OUTPUT_NAME: {0: "batch", 2: "half_depth", 3: "half_height", 4: "half_width"}},
            opset_version=OPSET,
            dynamo=False,
        )
    partial.replace(path)
    return path


def template_pair(shape: tuple[int, int, int] = CANVAS) -> tuple[np.ndarray, np.ndarray]:
    """The realistic pair of the parity check: ``uint8 (1, 1, *shape)`` fixed and moving brains.

    Read from this package's ``parity_pair.npz`` (a held-out synthetic pair of
    the MNI template at a coarser grid, written by
    :func:`lumireg.train.fixtures.write_parity_pair`; package data, so serving
    needs no training code) with each voxel repeated to fill ``shape``, which
    must be a whole multiple of the stored grid (the canvas is: 2x).
    """
    with (files("lumireg.export") / PARITY_PAIR_FILE).open("rb") as handle, np.load(handle) as stored:
        pair = tuple(stored[name] for name in NETWORK_INPUT_NAMES)
    factors = [n // s for n, s in zip(shape, pair[0].shape[2:])]
    if len(shape) != 3 or [f * s for f, s in zip(factors, pair[0].shape[2:])] != list(shape):
        raise ValueError(f"the parity pair's grid {pair[0].shape[2:]} does not divide {tuple(shape)}")
    for axis, factor in enumerate(factors, start=2):
        pair = tuple(image.repeat(factor, axis) for image in pair)
    return pair


def parity_inputs(shape: tuple[int, int, int] = CANVAS, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pairs every export is checked on: the template pair (:func:`template_pair`; only at the canvas
    size) and uniform random bytes (batch of 2, so the dynamic axis is exercised); ``uint8 (B, 1, *shape)``."""
    generator = np.random.default_rng(seed)
    pairs = {
        "random pair, batch 2": tuple(generator.integers(0, 256, (2, 1, *shape), dtype=np.uint8) for _ in range(2))
    }
    if tuple(shape) == CANVAS:
        pairs = {"template pair": template_pair(shape), **pairs}
    return pairs


def check_parity(
    model: LumiNet, run_exported, shapes=NETWORK_SHAPES, tolerance: float = PARITY_TOLERANCE
) -> dict[str, float]:
    """Max abs velocity difference of an exported graph against PyTorch, per input pair.

    ``run_exported(fixed_u8, moving_u8) -> velocity`` (numpy in, numpy out)
    runs the exported model on the :func:`parity_inputs` of each of ``shapes``
    (spatial sizes; a pair at another size than the canvas is named with its size). Raises ``RuntimeError``
    naming the pair if any difference exceeds ``tolerance`` (half-resolution voxels).
    """
    report = {}
    graph = VelocityGraph(model.eval())
    pairs = {
        name if tuple(shape) == CANVAS else f"{name}, {'x'.join(map(str, shape))}": pair
        for shape in shapes
        for name, pair in parity_inputs(shape).items()
    }
    for name, (fixed, moving) in pairs.items():
        with torch.no_grad():
            expected = graph(torch.from_numpy(fixed), torch.from_numpy(moving)).numpy()
        got = np.asarray(run_exported(fixed, moving), dtype=np.float32)
        if got.shape != expected.shape:
            raise RuntimeError(
                f"parity check, {name}: exported velocity has shape {got.shape}, expected {expected.shape}"
            )
        report[name] = float(np.abs(got - expected).max())
        if not report[name] <= tolerance:
            raise RuntimeError(
                f"parity check failed on the {name}: max |exported - PyTorch| = {report[name]:.3g} "
                f"half-resolution voxels > {tolerance:g}"
            )
    return report


def onnxruntime_session(path: str | Path, device: str = "cpu", device_id: int = 0):
    """An ONNX Runtime session on ``path``: CUDA execution provider for ``device="cuda"``, else CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no CPU arena: it keeps the largest working set of every input size it has seen (the canvas and the coarse
    # pass's halved pair, batches 1..8) and never returns it; blocks this large come straight from the system
    options.enable_cpu_mem_arena = False
    providers: list = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RuntimeError(
                "the network should run on CUDA but this onnxruntime has no CUDA execution provider; "
                "on a GPU host install the gpu extra in place of the server one: "
                "pip uninstall -y onnxruntime && pip install 'lumireg[gpu]' (README, 'On a GPU host')"
            )
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
    return onnxruntime.InferenceSession(str(path), options, providers=providers)


def onnxruntime_runner(session):
    """``(fixed_u8, moving_u8) -> velocity`` numpy callable over an ONNX Runtime session."""
    return lambda fixed, moving: session.run([NETWORK_OUTPUT_NAME], dict(zip(NETWORK_INPUT_NAMES, (fixed, moving))))[0]
