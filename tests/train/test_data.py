"""lumireg.train.data: the sample format, random crops, and the names the training loop imports."""

import pytest
import torch

from lumireg.train import data

SHAPE = (20, 37, 48)


def _indexed_sample():
    """Volumes whose values encode their voxel index, so a crop tells where it was cut."""
    index = torch.arange(torch.Size(SHAPE).numel()).view(1, *SHAPE)
    return {
        "fixed": index.float(),
        "moving": -index.float(),
        "fixed_labels": index.to(torch.int32),
        "moving_labels": (index % 7).to(torch.int32),
        "seed": 17,
        "fixed_path": "a.nii.gz",
    }


def test_random_crop_cuts_the_same_window_from_every_volume():
    sample = _indexed_sample()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        crop = data.random_crop(sample, (16, 32, 16), generator)
        start = torch.unravel_index(crop["fixed"][0, 0, 0, 0].long(), SHAPE)
        window = (slice(None),) + tuple(slice(int(a), int(a) + s) for a, s in zip(start, (16, 32, 16)))
        for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
            assert crop[key].shape == (1, 16, 32, 16)
            assert crop[key].dtype == sample[key].dtype
            assert torch.equal(crop[key], sample[key][window]), key
        assert crop["seed"] == 17 and crop["fixed_path"] == "a.nii.gz"


def test_random_crop_reaches_every_position_and_copies():
    sample = _indexed_sample()
    generator = torch.Generator().manual_seed(1)
    starts = set()
    for _ in range(200):
        crop = data.random_crop(sample, (16, 32, 48), generator)
        starts.add(tuple(int(a) for a in torch.unravel_index(crop["fixed"][0, 0, 0, 0].long(), SHAPE)))
    assert {s[0] for s in starts} == set(range(5)) and {s[1] for s in starts} == set(range(6))
    assert crop["fixed"].is_contiguous()
    assert crop["fixed"].untyped_storage().data_ptr() != sample["fixed"].untyped_storage().data_ptr()


def test_random_crop_is_reproducible_from_its_generator():
    sample = _indexed_sample()
    a = data.random_crop(sample, (16, 16, 16), torch.Generator().manual_seed(5))
    b = data.random_crop(sample, (16, 16, 16), torch.Generator().manual_seed(5))
    assert torch.equal(a["fixed"], b["fixed"])


@pytest.mark.parametrize("size", [(16, 30, 16), (32, 16, 16), (16, 16), (0, 16, 16)])
def test_random_crop_refuses_sizes_not_multiple_of_16_or_too_large(size):
    with pytest.raises(ValueError, match="multiples of 16"):
        data.random_crop(_indexed_sample(), size)


def test_random_crop_refuses_volumes_on_different_grids():
    sample = _indexed_sample()
    sample["moving"] = sample["moving"][:, :16]
    with pytest.raises(ValueError, match="one spatial shape"):
        data.random_crop(sample, (16, 16, 16))


def test_training_loop_recipe_crops_a_synthetic_pair():
    pairs = data.SyntheticPairs(data.training_seeds(10**9, start=0), shape=(40, 56, 48), split="train")
    crop = data.random_crop(pairs[123], (32, 48, 32), torch.Generator().manual_seed(0))
    assert crop["fixed"].shape == crop["moving"].shape == crop["fixed_labels"].shape == (1, 32, 48, 32)
    assert crop["seed"] == 123
    assert 0 <= crop["fixed"].min() and crop["fixed"].max() <= 1
