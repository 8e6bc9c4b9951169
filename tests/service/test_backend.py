"""The python-backend models' set-up, on a CPU: TF32 off and the instance's CUDA device made current.

``triton_python_backend_utils`` exists only inside Triton's stub, so a stand-in takes its place here.
"""

import importlib
import json
import sys
from unittest import mock

import pytest
import torch


@pytest.fixture
def models(monkeypatch):
    """The two model modules, imported against a stand-in for ``triton_python_backend_utils``."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", mock.MagicMock())
    names = ["lumireg.service.backend", "lumireg.service.network_model", "lumireg.service.registration_model"]
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    return [importlib.import_module(name) for name in names[1:]]


def _args(tmp_path, kind: str, device_id: int, parameter: str, value: str) -> dict:
    (tmp_path / "1").mkdir(exist_ok=True)
    (tmp_path / "1" / "model.onnx").touch()
    config = {"parameters": {parameter: {"string_value": value}}}
    return {
        "model_config": json.dumps(config),
        "model_repository": str(tmp_path),
        "model_version": "1",
        "model_instance_kind": kind,
        "model_instance_device_id": str(device_id),
    }


@pytest.fixture
def tf32_on():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_both_models_turn_tf32_off_when_they_initialise(models, tmp_path, monkeypatch, tf32_on):
    network_model, registration_model = models
    monkeypatch.setattr(network_model, "network_runner", lambda path, device: None)
    for module, parameter, value in (
        (network_model, "network_file", "model.onnx"),
        (registration_model, "network_model", "lumireg_network"),
    ):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        module.TritonPythonModel().initialize(_args(tmp_path, "CPU", 0, parameter, value))
        assert not torch.backends.cudnn.allow_tf32, module.__name__
        assert not torch.backends.cuda.matmul.allow_tf32, module.__name__


def test_a_gpu_instance_makes_its_device_current(models, tmp_path, monkeypatch, tf32_on):
    network_model, registration_model = models
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(network_model, "network_runner", lambda path, device: None)
    network = network_model.TritonPythonModel()
    network.initialize(_args(tmp_path, "GPU", 1, "network_file", "model.onnx"))
    entry = registration_model.TritonPythonModel()
    entry.initialize(_args(tmp_path, "GPU", 2, "network_model", "lumireg_network"))
    assert (network.device, entry.device) == (torch.device("cuda", 1), torch.device("cuda", 2))
    assert current == [torch.device("cuda", 1), torch.device("cuda", 2)]


def test_the_in_process_network_runs_without_tf32(tf32_on):
    from lumireg.export.repository import SOURCE_REPOSITORY, network_path
    from lumireg.service.pipeline import network_runner

    if not network_path(SOURCE_REPOSITORY).is_file():
        pytest.skip("no exported network (lumireg export)")
    network_runner(network_path(SOURCE_REPOSITORY), torch.device("cpu"))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
