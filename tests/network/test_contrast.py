"""lumireg.network.contrast: mapping the moving image's intensities to the fixed image's contrast."""

import pytest
import torch

from lumireg.network.contrast import apply_map, intensity_map


def _t1_and_t2(seed=0, shape=(12, 14, 16)):
    """A T1-like uint8 image of three tissues and the same anatomy in a T2-like contrast (background 0 in both)."""
    generator = torch.Generator().manual_seed(seed)
    tissue = torch.randint(0, 4, (1, 1, *shape), generator=generator)  # 0 background, 1 CSF, 2 GM, 3 WM
    t1_levels, t2_levels = torch.tensor([0, 40, 120, 200]), torch.tensor([0, 230, 140, 70])
    noise = torch.randint(-3, 4, tissue.shape, generator=generator) * (tissue > 0)
    return (t1_levels[tissue] + noise).to(torch.uint8), (t2_levels[tissue] + noise).to(torch.uint8), tissue


def test_a_t2_image_is_mapped_to_the_t1_contrast_of_the_same_anatomy():
    t1, t2, tissue = _t1_and_t2()
    table = intensity_map(t1, t2)
    assert table.shape == (1, 256) and table.dtype == torch.uint8 and table[0, 0] == 0
    mapped = apply_map(table, t2)
    assert mapped.shape == t2.shape and mapped.dtype == torch.uint8
    assert torch.equal(mapped == 0, t2 == 0)  # background stays background
    for level in (1, 2, 3):  # each tissue now has its T1 intensity, within the noise
        inside = tissue == level
        assert (mapped[inside].double().mean() - t1[inside].double().mean()).abs() < 3
    assert (mapped.double() - t1.double()).abs().mean() < 0.1 * (t2.double() - t1.double()).abs().mean()


def test_each_pair_of_a_batch_gets_its_own_map():
    (a1, a2, _), (b1, b2, _) = _t1_and_t2(1), _t1_and_t2(2)
    tables = intensity_map(torch.cat([a1, b2]), torch.cat([a2, b1]))  # second pair: T2 fixed, T1 moving
    assert torch.equal(tables[0], intensity_map(a1, a2)[0]) and torch.equal(tables[1], intensity_map(b2, b1)[0])
    assert tables[0][230] < 60 and tables[1][40] > 200  # CSF: bright in T2, dark in T1


def test_the_map_ignores_voxels_where_only_one_image_is_brain():
    """Misaligned brains overlap at their edges, where one image's CSF meets the other's background: a T1 moving
    image's dark CSF there must still map to T2's bright CSF, not towards the background's 0."""
    t1, t2, tissue = _t1_and_t2(3)  # fixed T2, moving T1
    moving = torch.where(tissue > 0, t1, torch.full_like(t1, 40))  # the fixed image's background is CSF here
    assert intensity_map(t2, moving)[0, 40] > 200
    assert intensity_map(t2, t1)[0, 40] > 200


def test_images_must_be_uint8_of_one_shape():
    t1, t2, _ = _t1_and_t2()
    with pytest.raises(ValueError, match="uint8"):
        intensity_map(t1.float(), t2)
