"""The ``lumireg`` model: the service's entry point (python backend).

For each batch of requests (Triton's dynamic batcher gathers up to 8 pairs):

1. checks what each request asks for (a request that cannot be served gets
   its own error; the rest of the batch goes on);
2. per group of requests with the same request parameters
   (:data:`lumireg.contract.PARAMETERS`: ``passes``, ``refine``, ``similarity``, ``align``),
   aligns each moving image to its fixed one when asked (affine, on the kernels),
   sends all their pairs in one request to ``lumireg_network`` (BLS) for the
   half-resolution velocity, once per pass, warping the moving images between
   passes, refining the last pass's velocity when asked and composing the
   transforms (:func:`lumireg.service.pipeline.transform`);
3. per request, :func:`lumireg.service.pipeline.postprocess` warps, inverts
   on demand and writes the QC report, on the instance's device: Triton kernels
   on a GPU, their PyTorch twins on a CPU;
4. answers with the outputs the request asked for, and records the stage
   times and each pair's NDV in the metrics (:class:`lumireg.service.backend.Metrics`).

A request that names no outputs gets all of them, less ``warped_labels`` when
it sent no ``moving_labels``.

Errors are answered with a Triton error code that the client acts on
(``pb_utils.TritonError``; the gRPC status it becomes in brackets):
``INVALID_ARG`` (INVALID_ARGUMENT) for a request that cannot be served as
sent, not to be retried; ``UNAVAILABLE`` (UNAVAILABLE) while the network model
is not loaded (the server is starting or stopping), to be retried;
``INTERNAL`` (INTERNAL) for anything else. The model stays up either way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from lumireg.contract import ENTRY_MODEL, EXPORT_RECORD, INTEGRATION_STEPS, OUTPUT_NAMES, request_parameters
from lumireg.contract import NETWORK_INPUT_NAMES as IMAGES
from lumireg.contract import NETWORK_OUTPUT_NAME as VELOCITY
from lumireg.service.backend import (
    Metrics,
    as_torch,
    error_response,
    input_tensor,
    output_tensor,
    use_instance_device,
)
from lumireg.service.pipeline import StageTimer, postprocess, transform


class RequestError(Exception):
    """A request answered with an error; ``code`` names its ``pb_utils.TritonError`` code, ``reason`` its metric."""

    code, reason = "INTERNAL", "internal"


class BadRequest(RequestError, ValueError):
    """The request cannot be served as sent (the caller's mistake): INVALID_ARG, not to be retried."""

    code, reason = "INVALID_ARG", "bad_request"


class NetworkUnavailable(RequestError):
    """The network model cannot answer now (server shutting down or starting): UNAVAILABLE, the client retries."""

    code, reason = "UNAVAILABLE", "unavailable"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.network_model = config["parameters"]["network_model"]["string_value"]
        self.device = use_instance_device(args)
        record_path = Path(args["model_repository"]).parent / self.network_model / "1" / EXPORT_RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        self.weights = record.get("weights", "unknown weights (no export.json)")
        self.steps = int(record.get("steps", INTEGRATION_STEPS))
        self.metrics = Metrics(ENTRY_MODEL)

    def _wanted(self, request, has_labels: bool) -> set[str]:
        wanted = set(request.requested_output_names())
        if wanted == set(OUTPUT_NAMES) and not has_labels:
            wanted.discard("warped_labels")  # everything by default, less what cannot be made
        if "warped_labels" in wanted and not has_labels:
            raise BadRequest(
                "output 'warped_labels' was requested but the input 'moving_labels' was not sent; "
                "send moving_labels (INT32 [1, 160, 224, 192]) or do not request warped_labels"
            )
        return wanted

    @staticmethod
    def _parameters(request) -> dict:
        """The request's parameters (:func:`lumireg.contract.request_parameters`); ``BadRequest`` if wrong."""
        try:
            return request_parameters(json.loads(request.parameters() or "{}"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    def _network_ready(self) -> bool:
        """Whether the network model is loaded and ready now (False when the server cannot say)."""
        try:
            return bool(pb_utils.is_model_ready(self.network_model))
        except Exception:  # a stopping server may not answer
            return False

    def _velocity(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        inputs = [output_tensor(name, image) for name, image in zip(IMAGES, (fixed, moving))]
        extra = {}
        if self.device.type == "cuda":
            extra["preferred_memory"] = pb_utils.PreferredMemory(
                pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index or 0
            )
        response = pb_utils.InferenceRequest(
            model_name=self.network_model, inputs=inputs, requested_output_names=[VELOCITY], **extra
        ).exec()
        if response.has_error():
            error = response.error()
            # the python backend (2.51) reports a call to an unloaded model as INTERNAL: ask for the model's state
            if error.code() == pb_utils.TritonError.UNAVAILABLE or not self._network_ready():
                raise NetworkUnavailable(
                    f"{self.network_model} is unavailable (the server is starting or stopping): {error.message()}"
                )
            raise RuntimeError(f"{self.network_model}: {error.message()}")
        return as_torch(pb_utils.get_output_tensor_by_name(response, VELOCITY), self.device)

    def execute(self, requests) -> list:
        start = time.perf_counter()
        responses: list = [None] * len(requests)
        accepted = []  # (index, fixed, moving, labels, wanted, parameters)
        for index, request in enumerate(requests):
            try:
                images = [input_tensor(request, name, self.device) for name in IMAGES]
                labels = input_tensor(request, "moving_labels", self.device)
                accepted.append(
                    (index, *images, labels, self._wanted(request, labels is not None), self._parameters(request))
                )
            except Exception as exc:  # this request only; the rest of the batch goes on
                responses[index] = self._error(exc, "")
        if accepted:
            try:
                self._register(requests, accepted, responses)
            except Exception as exc:  # answer every accepted request; the model stays up for the next batch
                for index, *_ in accepted:
                    responses[index] = self._error(exc, "lumireg: registration failed: ")
        self.metrics.stage("total", time.perf_counter() - start)
        return responses

    def _error(self, exc: Exception, prefix: str) -> pb_utils.InferenceResponse:
        """An error response with the code of ``exc`` (a :class:`RequestError`'s, else INTERNAL), counted."""
        code, reason = (exc.code, exc.reason) if isinstance(exc, RequestError) else ("INTERNAL", "internal")
        self.metrics.error(reason)
        return error_response(f"{prefix}{exc}", code)

    def _register(self, requests, accepted, responses) -> None:
        timer = StageTimer()
        groups = {}  # requests with the same parameters run together
        for request in accepted:
            groups.setdefault(tuple(sorted(request[5].items())), []).append(request)
        for key, group in sorted(groups.items()):
            fixed, moving = torch.cat([a[1] for a in group]), torch.cat([a[2] for a in group])
            found = transform(self._velocity, fixed, moving, **dict(key), steps=self.steps, timer=timer)
            row = 0
            for index, fixed, moving, labels, wanted, _ in group:
                rows = slice(row, row + fixed.shape[0])
                row = rows.stop
                out = postprocess(
                    found.displacement[rows],
                    [v[rows] for v in found.velocities],
                    fixed,
                    moving,
                    wanted,
                    moving_labels=labels,
                    refinement=found.refinement and found.refinement[rows],
                    alignment=found.alignment and found.alignment[rows],
                    contrast=found.contrast[rows],
                    coarse=found.coarse,
                    steps=self.steps,
                    model=self.weights,
                    timer=timer,
                )
                responses[index] = self._response(out)
                self.metrics.pairs.increment(fixed.shape[0])
        for stage, seconds in timer.seconds.items():
            self.metrics.stage(stage, seconds)

    def _response(self, out: dict) -> pb_utils.InferenceResponse:
        """The response holding :func:`postprocess`'s outputs; each QC report's NDV goes into the metrics."""
        tensors = []
        for name, value in out.items():
            if name == "qc":
                for report in value:
                    ndv = json.loads(report)["ndv_percent"]
                    if ndv is not None:  # None: an all-zero moving image, no voxel to count folds over
                        self.metrics.ndv.observe(ndv)
                value = np.array([[report.encode()] for report in value], dtype=np.object_)
            tensors.append(output_tensor(name, value))
        return pb_utils.InferenceResponse(output_tensors=tensors)
