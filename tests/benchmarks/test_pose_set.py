"""The accuracy benchmark's pose set: a scanner-pose copy that the true world motion maps back onto the original."""

import nibabel as nib
import numpy as np
import pytest
import torch

from lumireg.benchmarks import pose
from lumireg.benchmarks.accuracy import score, set_labels
from lumireg.benchmarks.landmarks import template_landmarks
from lumireg.client import geometry
from lumireg.contract import CANVAS
from lumireg.train.canvas import lumir_canvas


@pytest.fixture(scope="module")
def posed():
    canvas = lumir_canvas()
    image = torch.from_numpy(canvas.image.astype(np.float32) / 255)[None]
    labels = torch.from_numpy(canvas.labels.astype(np.int32))[None]
    points = template_landmarks()  # the template is both images: its landmarks are where they are
    sample = {"fixed": image, "moving": image, "fixed_labels": labels, "moving_labels": labels, "seed": 0}
    sample |= {"fixed_landmarks": points, "moving_landmarks": points}
    return sample, pose.posed_pair(sample, 0)


def test_the_posed_copy_is_stored_as_a_scanner_stores_it(posed):
    _, pair = posed
    moving, labels = pair["moving"], pair["moving_labels"]
    affine, shape = pose.posed_affine()
    assert moving.shape == labels.shape == shape and np.allclose(moving.affine, affine)
    assert nib.aff2axcodes(moving.affine) == ("L", "P", "S")
    assert np.allclose(np.linalg.norm(moving.affine[:3, :3], axis=0), pose.VOXEL_MM)
    assert moving.get_data_dtype() == np.float32 and not geometry.is_native(np.asanyarray(moving.dataobj))
    assert np.asanyarray(moving.dataobj).max() > 255  # a scanner's range, not LUMIR's 8 bits
    angle = np.degrees(np.arccos((np.trace(pair["world"][:3, :3]) - 1) / 2))
    assert 10 - 1e-6 <= angle <= 30 + 1e-6
    assert geometry.is_native(np.asanyarray(pair["fixed"].dataobj))


def test_the_true_motion_maps_the_posed_labels_back_and_no_registration_does_not(posed):
    sample, pair = posed
    labels = set_labels("pose")
    truth = pose.world_anchored(pair, np.zeros((3, *CANVAS), np.float32))  # the head's motion alone: the truth
    back = pose.on_fixed_grid(pair, "moving_labels", truth)
    right = score(truth, sample, labels, back, pair)
    warped, zero = pose.register_none(pair)
    wrong = score(zero, sample, labels, warped, pair)
    assert right["dice"] > 0.9 and right["ndv_percent"] == 0  # only the 1.3 mm slices' resampling is lost
    assert wrong["dice"] < 0.5
    assert right["tre"] < 1e-3 and wrong["tre"] > 10  # landmarks are followed through the world motion exactly
    image = pose.on_fixed_grid(pair, "moving", truth)
    inside = sample["fixed_labels"][0].numpy() > 0
    assert np.abs(image[inside] - sample["moving"][0].numpy()[inside]).mean() < 0.05


def test_the_pose_set_is_defined_on_lumirs_canvas_only():
    small = torch.zeros(1, 16, 16, 16)
    with pytest.raises(ValueError, match="canvas"):
        pose.posed_pair({"fixed": small, "moving": small, "moving_labels": small.int()}, 0)


def test_an_unposed_displacement_carried_through_the_motion_scores_alike_through_the_posed_labels(posed):
    sample, pair = posed
    labels = set_labels("pose")
    grid = np.meshgrid(*[np.linspace(0, np.pi, n) for n in CANVAS], indexing="ij")
    disp = np.stack([2.5 * np.sin(grid[1]) * np.sin(grid[2]), 1.5 * np.sin(grid[0]), -2.0 * np.sin(grid[2])])
    disp = disp.astype(np.float32)  # smooth, a few voxels: a registration's answer on the unposed pair
    direct = score(disp, sample, labels)
    carried = pose.world_anchored(pair, disp)
    through = score(carried, sample, labels, pose.on_fixed_grid(pair, "moving_labels", carried), pair)
    assert through["tre"] == pytest.approx(direct["tre"], abs=1e-3) and direct["tre"] > 1  # the same map
    assert through["ndv_percent"] == direct["ndv_percent"] == 0
    assert direct["dice"] - 0.05 < through["dice"] < direct["dice"]  # less only by the posed labels' resampling
    unmoved = score(disp, sample, labels, pose.on_fixed_grid(pair, "moving_labels", disp), pair)
    assert unmoved["dice"] < 0.5 and unmoved["tre"] > 10  # not carried through the motion, it misses the head
