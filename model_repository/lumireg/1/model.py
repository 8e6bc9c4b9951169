"""Triton python-backend entry; the model lives in lumireg.service.registration_model."""

from lumireg.service.registration_model import TritonPythonModel  # noqa: F401
