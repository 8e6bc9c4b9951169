"""lumireg.train.canvas: the MNI template on LUMIR's canvas, its mask, labels and affine."""

import nibabel as nib
import numpy as np
import pytest

from lumireg.contract import CANVAS
from lumireg.train.canvas import CROP_START, LABELS, TISSUES, lumir_canvas, template_path


@pytest.fixture(scope="module")
def canvas():
    return lumir_canvas()


def test_canvas_has_lumir_shape_and_uint8_intensities(canvas):
    assert CANVAS == (160, 224, 192)
    assert canvas.image.shape == canvas.labels.shape == canvas.mask.shape == CANVAS
    assert canvas.image.dtype == np.uint8 and canvas.mask.dtype == bool
    assert canvas.image.max() == 255
    # the robust maximum maps to 255: only a sliver of the brain saturates
    assert (canvas.image[canvas.mask] == 255).mean() < 0.005


def test_canvas_background_is_zero_outside_the_mask(canvas):
    assert not canvas.image[~canvas.mask].any()
    assert (canvas.image[canvas.mask] > 0).mean() > 0.9


def test_brain_is_centred_and_never_cut_by_the_canvas(canvas):
    voxels = np.argwhere(canvas.mask)
    centre = (np.array(CANVAS) - 1) / 2
    box_centre = (voxels.min(0) + voxels.max(0)) / 2
    assert np.abs(box_centre - centre).max() <= 1.0, box_centre
    assert np.abs(voxels.mean(0) - centre).max() < 8.0, voxels.mean(0)
    for axis in range(3):
        assert not canvas.mask.take([0, -1], axis=axis).any(), f"brain touches the canvas edge along axis {axis}"


def test_mask_covers_the_tissue_and_stays_compact(canvas):
    assert 1.5e6 < canvas.mask.sum() < 2.2e6  # an adult brain with CSF is about 1.5 to 2 litres


def test_labels_cover_exactly_the_mask(canvas):
    assert np.array_equal(canvas.labels > 0, canvas.mask)


def test_label_table_matches_the_label_volume(canvas):
    assert sorted(LABELS) == list(range(1, 25)) and len(set(LABELS.values())) == 24
    assert set(np.unique(canvas.labels)) == {0, *LABELS}
    i, j, k = np.indices(CANVAS, sparse=True)
    sides = {
        "left": i < canvas.centre[0],
        "right": i >= canvas.centre[0],
        "posterior": j < canvas.centre[1],
        "anterior": j >= canvas.centre[1],
        "inferior": k < canvas.centre[2],
        "superior": k >= canvas.centre[2],
    }
    for label, name in LABELS.items():
        tissue, *where = name.split("_")
        region = canvas.labels == label
        assert tissue in TISSUES and region.sum() > 10_000, name
        for side in where:
            assert not (region & ~np.broadcast_to(sides[side], CANVAS)).any(), f"{name} outside {side}"


def test_tissue_labels_follow_t1_contrast(canvas):
    mean = {t: canvas.image[(canvas.labels - 1) // 8 == n].mean() for n, t in enumerate(TISSUES)}
    assert mean["csf"] < mean["gm"] < mean["wm"], mean


def test_hemispheres_split_on_the_midsagittal_plane(canvas):
    # x = 0 mm is the mid-sagittal plane of the symmetric template
    assert (canvas.affine @ [canvas.centre[0], 0, 0, 1])[0] == 0
    left, right = canvas.mask[: canvas.centre[0]].sum(), canvas.mask[canvas.centre[0] :].sum()
    assert abs(left - right) / (left + right) < 0.02


def test_affine_is_1mm_and_overlays_the_template(canvas):
    template = nib.load(str(template_path("t1")))
    assert np.array_equal(canvas.affine[:3, :3], np.eye(3))
    assert nib.aff2axcodes(canvas.affine) == nib.aff2axcodes(template.affine) == ("R", "A", "S")
    # canvas voxel x and template voxel x + CROP_START are the same point in mm
    shift = np.linalg.inv(template.affine) @ canvas.affine @ [0, 0, 0, 1]
    assert np.array_equal(shift[:3], CROP_START)
    t1 = np.asarray(template.dataobj, dtype=np.float64)
    lo = np.maximum(CROP_START, 0)
    hi = np.minimum(np.add(CROP_START, CANVAS), t1.shape)
    same = canvas.image[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, CROP_START))].astype(np.float64)
    t1 = t1[tuple(slice(a, b) for a, b in zip(lo, hi))]
    inside = same > 0
    assert np.corrcoef(same[inside], t1[inside])[0, 1] > 0.999


def test_canvas_is_built_once_and_read_only(canvas):
    assert lumir_canvas() is canvas
    with pytest.raises(ValueError):
        canvas.image[0, 0, 0] = 1
