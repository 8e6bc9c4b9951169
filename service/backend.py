"""Helpers shared by lumireg's python-backend models: tensors in and out, device, metrics.

Only importable inside Triton's python backend stub, which provides
``triton_python_backend_utils``. Tensors arrive on the host, or on a GPU
when the client used CUDA shared memory (``FORCE_CPU_ONLY_INPUT_TENSORS=no``);
both become torch tensors without a copy where possible (DLPack).
"""

from __future__ import annotations

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils

from lumireg.service.pipeline import exact_float32

# seconds: the stages of one batch on a CPU (~0.05-2 s) and on a GPU (~1-50 ms)
STAGE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
NDV_BUCKETS = [0.0, 0.0001, 0.001, 0.01, 0.1, 1.0, 10.0]  # percent; LUMIR's goal is <= 0.01 %


def use_instance_device(args: dict) -> torch.device:
    """The model instance's device, set up for it: ``cuda:<id>`` for a GPU instance, else the CPU.

    On a GPU instance, ``args["model_instance_device_id"]`` becomes the current
    CUDA device: without an ``instance_group`` Triton puts an instance on every
    GPU, and the Triton kernels and the network launch on the current device.
    TF32 goes off in every instance (:func:`lumireg.service.pipeline.exact_float32`).
    """
    exact_float32()
    if args["model_instance_kind"] == "GPU":
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def as_torch(tensor, device: torch.device) -> torch.Tensor:
    """A ``pb_utils.Tensor`` (an input, or an output of a BLS call) as a torch tensor on ``device``."""
    value = torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else torch.utils.dlpack.from_dlpack(tensor)
    return value.to(device)


def input_tensor(request, name: str, device: torch.device) -> torch.Tensor | None:
    """Input ``name`` of ``request`` as a torch tensor on ``device``; None if the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else as_torch(tensor, device)


def output_tensor(name: str, value) -> pb_utils.Tensor:
    """A response (or BLS request) tensor from a torch tensor or a numpy array.

    A GPU tensor leaves by DLPack as the tensor itself, not a capsule: the
    python backend then calls its ``__dlpack__`` with the backend's stream and
    waits for that stream, so the kernels still queued on torch's stream (the
    float16 cast, a warp) finish before Triton reads the memory. A capsule is
    taken as it is, with no synchronisation.
    """
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, value.contiguous())
        value = value.contiguous().numpy()
    return pb_utils.Tensor(name, value)


def error_response(message: str, code: str = "INTERNAL") -> pb_utils.InferenceResponse:
    """An error answer. ``code``: ``INVALID_ARG`` (the caller's mistake; gRPC INVALID_ARGUMENT),
    ``UNAVAILABLE`` (try again: the server is starting or stopping) or ``INTERNAL``."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))


class Metrics:
    """lumireg's metric families on Triton's ``/metrics`` endpoint, beside Triton's own ``nv_*``.

    - ``lumireg_stage_seconds{model, stage}``: histogram, seconds per batch per
      stage (``network``, ``refine``, ``integrate``, ``warp``, ``qc``, ``total``);
    - ``lumireg_ndv_percent{model}``: histogram of the non-diffeomorphic volume (%) per pair with QC;
    - ``lumireg_pairs_total{model}``: pairs registered;
    - ``lumireg_request_errors_total{model, reason}``: requests answered with an error.

    The family objects are held here for the model's lifetime (a family that
    is garbage-collected takes its metrics off the endpoint).
    """

    def __init__(self, model: str):
        self.model = model
        kind = pb_utils.MetricFamily
        self.stage_family = kind("lumireg_stage_seconds", "Seconds per batch in each stage of lumireg", kind.HISTOGRAM)
        self.ndv_family = kind(
            "lumireg_ndv_percent", "Non-diffeomorphic volume (%) of each registered pair", kind.HISTOGRAM
        )
        self.pairs_family = kind("lumireg_pairs_total", "Image pairs registered by lumireg", kind.COUNTER)
        self.errors_family = kind(
            "lumireg_request_errors_total", "lumireg requests answered with an error", kind.COUNTER
        )
        self._stages, self._errors = {}, {}
        self.ndv = self.ndv_family.Metric(labels={"model": model}, buckets=NDV_BUCKETS)
        self.pairs = self.pairs_family.Metric(labels={"model": model})

    def stage(self, name: str, seconds: float) -> None:
        if name not in self._stages:
            self._stages[name] = self.stage_family.Metric(
                labels={"model": self.model, "stage": name}, buckets=STAGE_BUCKETS
            )
        self._stages[name].observe(seconds)

    def error(self, reason: str) -> None:
        if reason not in self._errors:
            self._errors[reason] = self.errors_family.Metric(labels={"model": self.model, "reason": reason})
        self._errors[reason].increment(1)
