"""lumireg.network: shapes, symmetry, receptive field and the checkpoint format."""

import pytest
import torch

from lumireg.network import LumiNet, NetworkConfig, load_model, read_checkpoint, save_checkpoint


def _pair(rng, batch=2, size=(32, 48, 64)):
    return torch.rand(batch, 1, *size, generator=rng), torch.rand(batch, 1, *size, generator=rng)


def _active_model(rng) -> LumiNet:
    """A network whose velocity head is not near zero, as it is after training."""
    model = LumiNet()
    with torch.no_grad():
        model.head.weight.copy_(0.1 * torch.randn(model.head.weight.shape, generator=rng))
    return model.eval()


def test_shapes_of_velocity_and_displacement(rng):
    fixed, moving = _pair(rng)
    model = _active_model(rng)
    with torch.no_grad():
        assert model.velocity(fixed, moving).shape == (2, 3, 16, 24, 32)
        disp = model(fixed, moving)
    assert disp.shape == (2, 3, 32, 48, 64) and disp.dtype == torch.float32
    assert disp.abs().max() > 0


def test_displacement_doubled_before_upsampling_equals_doubling_after_bit_for_bit(rng):
    # x2 is exact and trilinear upsampling linear, so doubling the eighth as many half-resolution voxels changes nothing
    from lumireg.kernels import integrate
    from lumireg.network.model import _upsample, velocity_to_displacement

    velocity = 3.0 * torch.randn(2, 3, 10, 12, 14, generator=rng)
    assert torch.equal(velocity_to_displacement(velocity, 7), 2.0 * _upsample(integrate(velocity, 7)))


def test_swapping_the_images_negates_the_velocity_exactly(rng):
    fixed, moving = _pair(rng)
    model = _active_model(rng)
    with torch.no_grad():
        forward, backward = model.velocity(fixed, moving), model.velocity(moving, fixed)
    assert forward.abs().max() > 1e-3
    assert torch.equal(forward, -backward)


def test_untrained_network_starts_near_identity(rng):
    with torch.no_grad():
        disp = LumiNet()(*_pair(rng))
    assert disp.abs().max() < 1e-2


def test_receptive_field_is_130_voxels_as_documented(rng):
    model = _active_model(rng)
    size = 176
    fixed = torch.rand(1, 1, size, size, size, generator=rng, requires_grad=True)
    moving = torch.rand(1, 1, size, size, size, generator=rng)
    centre = size // 4  # a half-resolution voxel near the middle
    model.velocity(fixed, moving)[0, :, centre, centre, centre].sum().backward()
    touched = fixed.grad[0, 0].abs() > 0
    for axis in range(3):
        reached = touched.any(dim=tuple(a for a in range(3) if a != axis)).nonzero()
        assert int(reached.max() - reached.min() + 1) == 130


def test_parameter_count_is_as_documented():
    assert sum(p.numel() for p in LumiNet().parameters()) == 218_771


@pytest.mark.parametrize(
    "fixed_shape,moving_shape,message",
    [
        ((1, 1, 32, 48, 60), (1, 1, 32, 48, 60), "fixed: spatial sizes must be positive multiples of 16"),
        ((1, 2, 32, 48, 64), (1, 2, 32, 48, 64), r"\(B, 1, D, H, W\)"),
        ((1, 1, 32, 48, 64), (1, 1, 32, 48, 48), "same shape"),
    ],
)
def test_bad_image_shapes_raise_value_error(fixed_shape, moving_shape, message):
    with pytest.raises(ValueError, match=message):
        LumiNet()(torch.zeros(fixed_shape), torch.zeros(moving_shape))


def test_checkpoint_round_trip_rebuilds_the_same_network(rng, tmp_path):
    model = LumiNet(NetworkConfig(channels=(4, 8, 8, 16), steps=5))
    with torch.no_grad():
        model.head.weight.copy_(0.1 * torch.randn(model.head.weight.shape, generator=rng))
    path = save_checkpoint(tmp_path / "run" / "model.pt", model, step=42, training={"note": "test"})
    loaded = load_model(path)
    assert loaded.config == model.config
    state = read_checkpoint(path)
    assert state["step"] == 42 and state["training"] == {"note": "test"}
    fixed, moving = _pair(rng, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(fixed, moving), model.eval()(fixed, moving))


def test_a_file_that_is_not_a_checkpoint_is_refused_clearly(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a lumireg checkpoint"):
        read_checkpoint(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip file")
    with pytest.raises(ValueError, match="not a lumireg checkpoint"):
        read_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_with_pickled_objects_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "lumireg-checkpoint", "version": 1, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="not a lumireg checkpoint"):
        read_checkpoint(path)


def test_unknown_network_config_keys_are_refused():
    with pytest.raises(ValueError, match="unknown network config keys"):
        NetworkConfig.from_dict({"channels": [8, 16, 32, 32], "depth": 5})


def test_inverse_comes_from_the_same_pass_and_equals_the_swapped_registration(rng):
    fixed, moving = _pair(rng)
    model = _active_model(rng)
    with torch.no_grad():
        forward, inverse = model.forward_and_inverse(fixed, moving)
        assert torch.equal(forward, model(fixed, moving))
        assert torch.equal(inverse, model(moving, fixed))
