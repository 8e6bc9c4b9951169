"""ONNX export and its parity check, the repository layout, and `lumireg export`'s errors."""

import json

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from lumireg.cli import main
from lumireg.contract import CANVAS, EXIT_MISSING_DEPENDENCY, EXIT_USAGE, EXPORT_RECORD, INTEGRATION_STEPS
from lumireg.export import repository
from lumireg.export.onnx import check_parity, export_onnx, onnxruntime_runner, onnxruntime_session, template_pair
from lumireg.network.model import LumiNet, NetworkConfig

SHAPE = (32, 32, 48)


@pytest.fixture
def small_model(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = LumiNet(NetworkConfig(channels=(4, 8, 8, 8)))
    with torch.no_grad():
        model.head.weight.normal_(std=0.1)  # a velocity far from zero, so differences would show
    return model.eval()


def test_onnx_matches_pytorch_with_a_dynamic_batch_and_size(small_model, tmp_path):
    path = export_onnx(small_model, tmp_path / "model.onnx", shape=SHAPE)
    run = onnxruntime_runner(onnxruntime_session(path))
    # traced at one size, the graph takes others (the coarse pass runs it on the halved pair)
    report = check_parity(small_model, run, shapes=[SHAPE, (16, 32, 64)])
    assert set(report) == {"random pair, batch 2, 32x32x48", "random pair, batch 2, 16x32x64"}
    assert all(0 <= difference <= 1e-4 for difference in report.values()), report
    batch = np.random.default_rng(0).integers(0, 256, (3, 1, *SHAPE), dtype=np.uint8)
    velocity = run(batch, batch[::-1].copy())
    assert velocity.shape == (3, 3, *(n // 2 for n in SHAPE))
    assert np.abs(velocity[1]).max() < 1e-5 < np.abs(velocity[0]).max()  # the middle pair is (x, x): zero velocity


def test_parity_check_rejects_a_wrong_export(small_model, tmp_path):
    path = export_onnx(small_model, tmp_path / "model.onnx", shape=SHAPE)
    run = onnxruntime_runner(onnxruntime_session(path))
    with pytest.raises(RuntimeError, match="parity check failed"):
        check_parity(small_model, lambda f, m: run(f, m) + 1e-3, shapes=[SHAPE])
    other = LumiNet(NetworkConfig(channels=(4, 8, 8, 8)))
    with torch.no_grad():
        other.head.weight.normal_(std=0.1)
    with pytest.raises(RuntimeError, match="parity check failed"):
        check_parity(other.eval(), run, shapes=[SHAPE])


def test_the_parity_pair_is_what_its_generator_writes():
    from lumireg.train.fixtures import parity_pair

    made = parity_pair()
    fixed, moving = template_pair(CANVAS)
    for name, shipped in (("fixed", fixed), ("moving", moving)):
        assert shipped.shape == (1, 1, *CANVAS) and shipped.dtype == np.uint8
        stored = shipped[:, :, ::2, ::2, ::2]  # each stored voxel fills a 2x2x2 block of the canvas
        assert np.array_equal(np.repeat(np.repeat(np.repeat(stored, 2, 2), 2, 3), 2, 4), shipped), name
        assert stored.shape == made[name].shape
        # the same pair; float sums may differ across CPUs and move a voxel sitting on a half grey level by one
        differs = stored != made[name]
        assert np.abs(stored.astype(int) - made[name]).max() <= 1 and differs.mean() < 1e-4, (name, differs.sum())
        assert 0.2 < (stored > 0).mean() < 0.4, "not a brain on its canvas"


def test_the_parity_pair_fills_only_whole_multiples_of_its_grid():
    with pytest.raises(ValueError, match="does not divide"):
        template_pair((160, 224, 190))


def test_the_set_up_export_passed_its_parity_check():
    record_path = repository.network_path(repository.SOURCE_REPOSITORY).parent / EXPORT_RECORD
    if not record_path.is_file():
        pytest.skip("run `make test` (or `lumireg export`) so set-up exports the bundled weights")
    record = json.loads(record_path.read_text())
    assert set(record["parity_max_abs_velocity"]) == {
        "template pair",
        "random pair, batch 2",
        "random pair, batch 2, 80x112x96",
    }
    assert max(record["parity_max_abs_velocity"].values()) <= 1e-4
    assert record["steps"] == INTEGRATION_STEPS and record["opset"] == 17 and "lumireg-default" in record["weights"]


@pytest.mark.parametrize("variant", repository.VARIANTS)
def test_every_config_is_a_valid_triton_model_config(variant):
    entry = text_format.Parse(repository.entry_config(), model_config_pb2.ModelConfig())
    network = text_format.Parse(repository.network_config(variant), model_config_pb2.ModelConfig())
    assert entry.max_batch_size == network.max_batch_size == 8
    assert [i.name for i in entry.input] == ["fixed", "moving", "moving_labels"]
    assert [i.optional for i in entry.input] == [False, False, True]
    # spatial sizes free: the canvas for a full-resolution pass, the halved pair for the coarse one
    assert [list(i.dims) for i in network.input] == [[1, -1, -1, -1]] * 2
    assert [list(i.dims) for i in network.output] == [[3, -1, -1, -1]]
    expected = {"python": ("python", ""), "onnx": ("", "onnxruntime_onnx"), "tensorrt": ("", "tensorrt_plan")}[variant]
    assert (network.backend, network.platform) == expected


def test_committed_repository_is_what_the_exporter_writes(tmp_path):
    written = repository.write_repository(tmp_path / "python")
    for relative in repository.repository_files("python"):
        assert (written / relative).read_text() == (repository.SOURCE_REPOSITORY / relative).read_text(), relative


def test_switching_variant_removes_the_python_network_model(tmp_path):
    root = repository.write_repository(tmp_path, "python")
    assert (root / "lumireg_network/1/model.py").is_file()
    repository.write_repository(root, "onnx")
    assert not (root / "lumireg_network/1/model.py").exists()
    assert 'platform: "onnxruntime_onnx"' in (root / "lumireg_network/config.pbtxt").read_text()
    with pytest.raises(ValueError, match="unknown repository variant"):
        repository.write_repository(root, "tensorflow")


def test_export_command_says_what_is_missing_for_tensorrt(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    if torch.cuda.is_available():
        pytest.skip("this host may build TensorRT plans")
    assert main(["export", "--trt", "--repository", str(tmp_path)]) == EXIT_MISSING_DEPENDENCY
    message = capsys.readouterr().err
    assert "TensorRT plan cannot be built here" in message and "CUDA GPU" in message


def test_export_command_refuses_fp16_onnx(tmp_path, capsys):
    assert main(["export", "--fp16", "--repository", str(tmp_path)]) == EXIT_USAGE
    assert "fp16 applies to TensorRT plans only" in capsys.readouterr().err
