"""Triton python-backend entry; the model lives in lumireg.service.network_model."""

from lumireg.service.network_model import TritonPythonModel  # noqa: F401
