"""lumireg.train.lumir: the LUMIR dataset JSON reader, on a tiny fake dataset written with nibabel."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from lumireg.train.lumir import LumirPairs

SHAPE = (12, 14, 16)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


@pytest.fixture
def dataset(tmp_path, rng):
    """4 training images (the first two with labels), 2 validation pairs, and the JSON (``./`` paths, as LUMIR's)."""
    images = {}
    for n in range(6):
        folder = "imagesTr" if n < 4 else "imagesVal"
        data = torch.randint(0, 256, SHAPE, generator=rng, dtype=torch.uint8).numpy()
        images[n] = data
        _write(tmp_path / folder / f"LUMIRMRI_{n:04d}_0000.nii.gz", data)
    for n in range(2):
        _write(tmp_path / "labelsTr" / f"LUMIRMRI_{n:04d}.nii.gz", np.full(SHAPE, n + 1, np.uint8))
    training = [{"image": f"./imagesTr/LUMIRMRI_{n:04d}_0000.nii.gz"} for n in range(4)]
    for n in range(2):
        training[n]["label"] = f"./labelsTr/LUMIRMRI_{n:04d}.nii.gz"
    validation = [
        {"fixed": "./imagesVal/LUMIRMRI_0004_0000.nii.gz", "moving": "./imagesVal/LUMIRMRI_0005_0000.nii.gz"},
        {"fixed": "./imagesVal/LUMIRMRI_0005_0000.nii.gz", "moving": "./imagesTr/LUMIRMRI_0000_0000.nii.gz"},
    ]
    path = tmp_path / "LUMIR_dataset.json"
    path.write_text(json.dumps({"name": "LUMIR", "training": training, "validation": validation}))
    return path, images


def _number(path: str) -> int:
    return int(path.rsplit("LUMIRMRI_", 1)[1][:4])


def test_training_pairs_are_two_distinct_images_with_their_data(dataset):
    path, images = dataset
    pairs = LumirPairs(path, shape=None, length=40)
    assert len(pairs) == 40
    seen = set()
    for k in range(len(pairs)):
        sample = pairs[k]
        f, m = _number(sample["fixed_path"]), _number(sample["moving_path"])
        assert f != m and {f, m} <= {0, 1, 2, 3}
        seen |= {(f, m)}
        for key, n in (("fixed", f), ("moving", m)):
            assert sample[key].shape == (1, *SHAPE) and sample[key].dtype == torch.float32
            assert torch.allclose(sample[key][0], torch.from_numpy(images[n] / 255).float())
    assert len(seen) >= 8, "pairs should range over the ordered pairs"


def test_training_pairs_depend_only_on_seed_and_index(dataset):
    path, _ = dataset

    def order(pairs):
        return [(pairs[k]["fixed_path"], pairs[k]["moving_path"]) for k in range(20)]

    first = order(LumirPairs(path, shape=None, seed=3, length=20))
    assert order(LumirPairs(path, shape=None, seed=3, length=20)) == first
    assert order(LumirPairs(path, shape=None, seed=4, length=20)) != first
    assert len(LumirPairs(path, shape=None)) == 4 * 3  # default: every ordered pair's worth


def test_labels_are_returned_only_when_both_images_have_them(dataset):
    path, _ = dataset
    pairs = LumirPairs(path, shape=None, length=40)
    for k in range(len(pairs)):
        sample = pairs[k]
        both = {_number(sample["fixed_path"]), _number(sample["moving_path"])} == {0, 1}
        assert ("fixed_labels" in sample) == ("moving_labels" in sample) == both
        if both:
            assert sample["fixed_labels"].dtype == torch.int32
            assert (sample["fixed_labels"] == _number(sample["fixed_path"]) + 1).all()


def test_validation_pairs_are_the_listed_pairs_in_order(dataset):
    path, images = dataset
    pairs = LumirPairs(path, split="validation", shape=None)
    assert len(pairs) == 2
    expected = [(4, 5), (5, 0)]
    for k, (f, m) in enumerate(expected):
        sample = pairs[k]
        assert (_number(sample["fixed_path"]), _number(sample["moving_path"])) == (f, m)
        assert torch.allclose(sample["moving"][0], torch.from_numpy(images[m] / 255).float())
    with pytest.raises(IndexError):
        pairs[2]
    with pytest.raises(ValueError, match="length"):
        LumirPairs(path, split="validation", shape=None, length=5)


def test_data_dir_overrides_the_json_folder(dataset, tmp_path):
    path, _ = dataset
    moved = tmp_path / "elsewhere" / "dataset.json"
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    with pytest.raises(FileNotFoundError):
        LumirPairs(moved, shape=None)
    assert len(LumirPairs(moved, data_dir=tmp_path, shape=None, length=3)) == 3


def test_missing_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        LumirPairs(tmp_path / "nowhere.json")


@pytest.mark.parametrize(
    "content",
    [
        '{"training": [',
        '{"validation": []}',
        '{"training": [{"img": "a.nii.gz"}]}',
        "[1, 2]",
        '{"training": [{"image": "a.nii.gz", "label": 3}]}',
    ],
)
def test_malformed_json_names_the_path(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="broken.json"):
        LumirPairs(path, shape=None)


def test_missing_image_is_reported_up_front_by_path(dataset):
    path, _ = dataset
    (path.parent / "imagesTr" / "LUMIRMRI_0002_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="LUMIRMRI_0002_0000.nii.gz"):
        LumirPairs(path, shape=None)
    (path.parent / "imagesVal" / "LUMIRMRI_0005_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="LUMIRMRI_0005_0000.nii.gz"):
        LumirPairs(path, split="validation", shape=None)


def test_image_of_another_shape_is_reported_up_front_by_path(dataset):
    path, _ = dataset
    _write(path.parent / "imagesTr" / "LUMIRMRI_0003_0000.nii.gz", np.zeros((12, 14, 15), np.uint8))
    with pytest.raises(ValueError, match="LUMIRMRI_0003_0000.nii.gz.*(12, 14, 15)"):
        LumirPairs(path, shape=None)


def test_images_must_have_the_expected_shape(dataset):
    path, _ = dataset
    with pytest.raises(ValueError, match=r"LUMIRMRI_0000_0000.nii.gz.*\(160, 224, 192\)"):
        LumirPairs(path)  # default: LUMIR's canvas
    assert LumirPairs(path, shape=SHAPE, length=1)[0]["fixed"].shape == (1, *SHAPE)


def test_training_needs_two_images(tmp_path):
    _write(tmp_path / "a.nii.gz", np.zeros(SHAPE, np.uint8))
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(ValueError, match="two images"):
        LumirPairs(path, shape=None)
