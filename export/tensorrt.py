"""ONNX -> TensorRT plan for the ``tensorrt`` repository variant, and a runner for its parity check.

Needs the ``tensorrt`` Python package and a CUDA GPU; the plan is specific to
that GPU model and TensorRT version, so build it on the serving host (or in
its image). The plan takes a batch of 1..8 pairs of the coarse pass's size
(80 x 112 x 96) up to the canvas (one optimisation profile, optimised for one
pair on the canvas).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lumireg.contract import MAX_BATCH_SIZE, NETWORK_INPUT_NAMES, NETWORK_OUTPUT_NAME, NETWORK_SHAPES

FP16_TOLERANCE = 0.05  # max |plan - PyTorch| on the velocity (half-resolution voxels) accepted for an fp16 plan


class ExportUnavailable(RuntimeError):
    """What this host lacks to build the requested export."""


def _tensorrt():
    missing = []
    try:
        import tensorrt
    except ImportError:
        tensorrt = None
        missing.append("the tensorrt Python package (pip install tensorrt, matching the server's TensorRT)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if missing:
        raise ExportUnavailable(
            "a TensorRT plan cannot be built here: it needs "
            + " and ".join(missing)
            + ". The ONNX export (the default, `lumireg export`) works without them."
        )
    return tensorrt


def build_plan(onnx_path: str | Path, plan_path: str | Path, fp16: bool = False) -> Path:
    """Build and write a TensorRT plan of the ONNX velocity graph (batch 1..8)."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    smallest, largest = (tuple(min(s) for s in zip(*NETWORK_SHAPES)), tuple(max(s) for s in zip(*NETWORK_SHAPES)))
    for name in NETWORK_INPUT_NAMES:  # batch 1..8, spatial sizes from the coarse pass's to the canvas
        profile.set_shape(name, (1, 1, *smallest), (1, 1, *largest), (MAX_BATCH_SIZE, 1, *largest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the plan (see its log above)")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


def plan_runner(plan_path: str | Path):
    """``(fixed_u8, moving_u8) -> velocity`` numpy callable running a plan on the current GPU."""
    trt = _tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(plan_path).read_bytes())
    context = engine.create_execution_context()

    def run(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
        feeds = {
            name: torch.from_numpy(np.ascontiguousarray(a)).cuda()
            for name, a in zip(NETWORK_INPUT_NAMES, (fixed, moving))
        }
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(context.get_tensor_shape(NETWORK_OUTPUT_NAME)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(NETWORK_OUTPUT_NAME, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()

    return run
