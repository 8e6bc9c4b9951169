"""The ``lumireg_network`` model of the embedded server: the ONNX graph in ONNX Runtime, in the python backend.

The embedded ``tritonserver`` (from nvidia-pytriton) has only the python
backend, so the network runs here: in ONNX Runtime on a CPU instance; on a
GPU instance in ONNX Runtime's CUDA execution provider when onnxruntime-gpu
is installed in place of onnxruntime, else in PyTorch on CUDA from the
checkpoint that ``lumireg export`` copies beside the ONNX file (the same
weights; the export's parity check ties the two): see
:func:`lumireg.service.pipeline.network_runner`. In the production image
Triton's own ``onnxruntime_onnx`` or ``tensorrt_plan`` backend takes this
model's place with the same inputs and outputs (:mod:`lumireg.export.repository`).
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from lumireg.contract import NETWORK_INPUT_NAMES, NETWORK_OUTPUT_NAME
from lumireg.service.backend import error_response, input_tensor, output_tensor, use_instance_device
from lumireg.service.pipeline import network_runner


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        network_file = config["parameters"]["network_file"]["string_value"]
        path = Path(args["model_repository"]) / args["model_version"] / network_file
        if not path.is_file():
            raise pb_utils.TritonModelException(f"{path} is missing: run `lumireg export` to write the network")
        self.device = use_instance_device(args)
        self.network = network_runner(path, self.device)

    def execute(self, requests) -> list:
        responses = []
        for request in requests:
            try:
                velocity = self.network(*(input_tensor(request, name, self.device) for name in NETWORK_INPUT_NAMES))
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[output_tensor(NETWORK_OUTPUT_NAME, velocity)])
                )
            except Exception as exc:  # an error answers this request; the model stays up for the next
                responses.append(error_response(f"lumireg_network: {exc}"))
        return responses
