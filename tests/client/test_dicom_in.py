"""DICOM in: series written by pydicom from synthetic volumes read back equal to the source in world space."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # dicom_series.py beside this file (pytest runs in importlib mode)

from dicom_series import rotation, same_in_world, write_enhanced, write_series  # noqa: E402

from lumireg.client import InputError  # noqa: E402
from lumireg.client.dicom import read_segmentation, read_series  # noqa: E402
from lumireg.client.dicom_out import segmentation  # noqa: E402
from lumireg.client.registration import _load_labels, load_image  # noqa: E402

SHAPE = (12, 10, 7)
AXIAL = np.array([[-0.9, 0, 0, 40.0], [0, -1.1, 0, 30.5], [0, 0, 2.5, -12.0], [0, 0, 0, 1]])  # LPS-stored axial
SAGITTAL = np.array([[0, 0, 1.5, -30.0], [-1.0, 0, 0, 60.0], [0, -1.2, 0, 50.0], [0, 0, 0, 1]])
GEOMETRIES = {
    "axial": AXIAL,
    "sagittal": SAGITTAL,
    "oblique": rotation(0, 17) @ rotation(2, -23) @ AXIAL,
    "slices against the normal": AXIAL @ np.diag([1.0, 1.0, -1.0, 1.0]),
}


@pytest.fixture
def volume():
    return np.random.default_rng(7).integers(-200, 3000, SHAPE).astype(np.int16)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("order", ["forward", "reversed", "shuffled names"])
def test_a_series_reads_back_as_its_source_in_world_space(geometry, order, volume, tmp_path):
    affine = GEOMETRIES[geometry]
    paths = write_series(
        tmp_path / "series",
        volume,
        affine,
        instance_order="reversed" if order == "reversed" else "forward",
        shuffle_names=order == "shuffled names",
    )
    image = load_image(tmp_path / "series", "fixed")
    assert image.data.dtype == np.int16
    assert same_in_world(volume, affine, image.data, image.affine, atol_mm=1e-4)
    listed = load_image([str(p) for p in paths[::-1]], "fixed")  # a list of files, in any order
    np.testing.assert_array_equal(listed.data, image.data)
    np.testing.assert_allclose(listed.affine, image.affine, atol=1e-9)
    # the volume's slice axis is the normal row x column, and its slices are in the order of their positions
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    assert np.cross(lps[:3, 0], lps[:3, 1]) @ lps[:3, 2] > 0


def test_rescale_slope_and_intercept_give_the_real_values(volume, tmp_path):
    real = volume.astype(np.float32) * 0.5 - 1024
    write_series(tmp_path / "s", real, AXIAL, rescale=(0.5, -1024.0))
    image = load_image(tmp_path / "s", "moving")
    assert image.data.dtype == np.float32
    assert same_in_world(real, AXIAL, image.data, image.affine)


def test_an_enhanced_multi_frame_image_is_placed_frame_by_frame(volume, tmp_path):
    affine = rotation(1, 11) @ SAGITTAL
    path = write_enhanced(tmp_path / "enhanced.dcm", volume, affine, frame_order=[3, 0, 6, 1, 5, 2, 4])
    image = load_image(path, "fixed")
    assert same_in_world(volume, affine, image.data, image.affine)
    assert len(image.dicom.datasets) == 1


def test_a_missing_slice_is_refused_with_the_gap_named(volume, tmp_path):
    write_series(tmp_path / "s", volume, AXIAL, drop_slice=3)
    with pytest.raises(InputError, match=r"moving: slices are unevenly spaced: a gap of 5\.000 mm .*missing slice"):
        load_image(tmp_path / "s", "moving")


def test_two_series_in_a_folder_are_refused_unless_one_is_chosen(volume, tmp_path):
    write_series(tmp_path / "both" / "a", volume, AXIAL)
    write_series(tmp_path / "both" / "b", volume[::-1].copy(), SAGITTAL)
    (tmp_path / "both" / "README.txt").write_text("not DICOM: skipped")
    with pytest.raises(InputError, match="fixed: 2 series found .*choose one by Series Instance UID"):
        load_image(tmp_path / "both", "fixed")
    uid = read_series(tmp_path / "both" / "b").series_uid
    chosen = load_image(tmp_path / "both", "fixed", series_uid=uid)
    assert same_in_world(volume[::-1], SAGITTAL, chosen.data, chosen.affine)
    with pytest.raises(InputError, match="no series 1.2.3"):
        load_image(tmp_path / "both", "fixed", series_uid="1.2.3")


@pytest.mark.parametrize(
    "case, message",
    [
        ("no DICOM", "no DICOM file"),
        ("two slices at one position", "two slices at the same position"),
        ("no pixel data", "has no pixel data"),
    ],
)
def test_what_is_no_volume_gets_one_clear_line(case, message, volume, tmp_path):
    import pydicom

    folder = tmp_path / "s"
    if case == "no DICOM":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
    else:
        paths = write_series(folder, volume, AXIAL)
        ds = pydicom.dcmread(str(paths[1]))
        if case == "no pixel data":
            del ds.PixelData
        else:
            ds.ImagePositionPatient = pydicom.dcmread(str(paths[0])).ImagePositionPatient
        ds.save_as(str(paths[1]))
    with pytest.raises(InputError, match=message) as raised:
        load_image(folder, "fixed")
    assert "\n" not in str(raised.value)


def test_a_seg_on_the_moving_series_reads_back_as_its_labels(volume, tmp_path):
    write_series(tmp_path / "s", volume, GEOMETRIES["oblique"])
    series = read_series(tmp_path / "s")
    labels = np.zeros(series.data.shape, np.int32)
    labels[2:6, 3:8, 1:4], labels[7:11, 1:5, 2:6] = 1, 2
    labels[3, 3, 5] = 3
    seg = segmentation(labels, series, None, "test", "tag")
    seg.save_as(str(tmp_path / "seg.dcm"))
    read, segments, _ = read_segmentation(tmp_path / "seg.dcm", series.affine, series.data.shape)
    np.testing.assert_array_equal(read, labels)
    assert [int(s.SegmentNumber) for s in segments] == [1, 2, 3]
    moving = load_image(tmp_path / "s", "moving")
    np.testing.assert_array_equal(_load_labels(tmp_path / "seg.dcm", moving).data, labels)
    other = load_image(tmp_path / "s", "moving")
    other.affine = other.affine @ np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 0.7]] * 3 + [[0, 0, 0, 0]])
    with pytest.raises(InputError, match="does not lie on a slice of the moving image's grid"):
        _load_labels(tmp_path / "seg.dcm", other)
