"""lumireg bench traffic: bytes each kernel moves, counted under the interpreter, on volumes small enough for CI."""

import json

import pytest
import torch

from lumireg.benchmarks import traffic
from lumireg.contract import EXIT_OK, EXIT_USAGE
from lumireg.kernels import warp


def test_identity_warp_moves_exactly_its_floor_of_20_bytes_a_voxel():
    """Zero displacement: every output voxel reads its own 3 displacement values and image voxel and writes one
    value (4 + 12 + 4 bytes, each address once); the interpolation corners it asks for are counted as requested."""
    image = torch.rand(1, 1, 4, 5, 6)
    disp = torch.zeros(1, 3, 4, 5, 6)
    with traffic.counting() as launches:
        out = warp(image, disp, backend="triton")
    assert torch.equal(out, image)
    [one] = launches
    assert one.kernel == "_warp_forward_kernel"
    assert one.unique_bytes() == (16 * 120, 4 * 120)
    assert one.read_requested >= 16 * 120 and one.write_requested == 4 * 120


def test_counting_restores_the_interpreter_and_records_nothing_outside_its_block():
    from triton.runtime import interpreter

    load = interpreter.InterpreterBuilder.create_masked_load
    with traffic.counting() as launches:
        pass
    warp(torch.rand(1, 1, 3, 3, 3), torch.zeros(1, 3, 3, 3, 3), backend="triton")
    assert launches == [] and interpreter.InterpreterBuilder.create_masked_load is load


def test_ncc_backward_sweeps_the_kept_coefficients_only():
    """Three backward launches (W and H sweeps of the 5 coefficients, then D and the gradient): 116 bytes a voxel
    away from the borders, where no window tap is masked; never the products' sweep again."""
    result = traffic.measure("local_ncc", (10, 12, 14))
    backward = result["bwd"]
    assert backward["launches"] == 3 and "_ncc_products_w_kernel" not in backward["kernels"]
    # + the upstream gradient (one value) and, forward, one partial sum per program: well under 0.01 a voxel
    assert backward["unique"] == pytest.approx(116, abs=0.01)
    sweeps = 8 + 20 + 20 + 20 + 20  # I, J in; W sums out; in, H sums out; in (the D sweep)
    assert result["fwd"]["unique"] == pytest.approx(sweeps, abs=0.01)
    assert result["fwd+bwd"]["unique"] == pytest.approx(sweeps + 20 + 116, abs=0.01)  # + the kept coefficients


def test_command_writes_per_op_counts_and_refuses_unknown_ops(tmp_path, capsys):
    class Args:
        shape, ops, out = "6,7,8", "warp", str(tmp_path)

    assert traffic.run(Args) == EXIT_OK
    result = json.loads((tmp_path / "interpreter" / "traffic.json").read_text())
    assert result["benchmark"] == "traffic" and set(result["ops"]) == {"warp"}
    assert set(result["ops"]["warp"]) == {"fwd", "bwd", "fwd+bwd"} and result["ops"]["warp"]["bwd"]["unique"] > 0
    Args.ops = "warp,fft"
    assert traffic.run(Args) == EXIT_USAGE
    assert "fft" in capsys.readouterr().err
