"""TRE landmarks: corners of the template, located exactly in generated images through their true fields."""

import numpy as np
import pytest

from lumireg.benchmarks import landmarks
from lumireg.benchmarks.independent_pairs import independent_pair
from lumireg.benchmarks.pose import fixed_affine, to_unposed
from lumireg.contract import CANVAS
from lumireg.train.canvas import lumir_canvas
from lumireg.train.synthetic import synthetic_pair

SHAPE = (32, 48, 40)  # the canvas's field of view at 5 x 4.67 x 4.8 mm


def test_landmarks_are_separated_corners_inside_the_brain():
    points = landmarks.template_landmarks()
    assert points.shape == (landmarks.COUNT, 3)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(len(points)) * 1e9
    assert distances.min() >= landmarks.MIN_SEPARATION_MM
    mask = lumir_canvas().mask
    assert mask[tuple(points.astype(int).T)].all()
    # not a fixed pattern: they sit where the template has structure in every direction, spread over the brain
    spread = points.std(0)
    assert (spread > 15).all(), spread


def _true_displacement(fixed_disp: np.ndarray, moving_disp: np.ndarray) -> np.ndarray:
    """The exact fixed -> moving pull-back of a generated pair: fixed voxel x shows canvas point x + u_f(x), which the
    moving image shows at locate(x + u_f(x), u_m)."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in fixed_disp.shape[1:]], indexing="ij"))
    points = (grid + fixed_disp).reshape(3, -1).T
    return (landmarks.locate(points, moving_disp, within=False).T.reshape(grid.shape) - grid).astype(np.float32)


@pytest.mark.parametrize("generator", ["independent", "synthetic"])
def test_the_true_transform_scores_near_zero_tre_and_no_registration_does_not(generator):
    if generator == "independent":
        pair = independent_pair(5, SHAPE, labels=False, fields=True)
    else:
        pair = {
            k: v.numpy() for k, v in synthetic_pair(1_000_005, SHAPE, labels=False, fields=True).items() if k != "seed"
        }
    found = landmarks.pair_landmarks(pair["fixed_disp"], pair["moving_disp"])
    # each located landmark shows the template point: x + u(x) = p
    points = landmarks.on_grid(landmarks.template_landmarks(), SHAPE)
    for image in ("fixed", "moving"):
        x = found[f"{image}_landmarks"]
        np.testing.assert_allclose(x + landmarks.sample(pair[f"{image}_disp"], x), points, atol=2e-3)
    exact = landmarks.tre(_true_displacement(pair["fixed_disp"], pair["moving_disp"]), **found)
    none = landmarks.tre(np.zeros_like(pair["fixed_disp"]), **found)
    assert exact < 0.05 and none > 0.5, (exact, none)


def test_locate_refuses_a_field_it_cannot_invert():
    folding = np.zeros((3, 8, 8, 8), np.float32)
    folding[0] = -2.0 * (np.arange(8)[:, None, None] - 3.5)  # x + u(x) = 7 - x: reversed, x <- p - u(x) diverges
    with pytest.raises(ValueError, match="not located"):
        landmarks.locate(np.array([[2.0, 3.0, 3.0]]), folding)


def test_a_world_anchored_displacement_is_followed_back_to_the_unposed_moving_image():
    world = np.eye(4)
    angle = np.radians(20)
    world[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    world[:3, 3] = [12.0, -7.0, 20.0]
    canvas = fixed_affine()
    unposed = np.array([[70.0, 100.0, 90.0], [40.0, 150.0, 60.0]])  # moving landmarks, unposed canvas voxels
    posed_world = (world @ canvas @ np.c_[unposed, np.ones(2)].T)[:3].T  # where the posed image shows them
    fixed = np.array([[71.0, 98.0, 91.0], [42.0, 149.0, 58.0]])
    # a displacement that sends each fixed landmark exactly to its posed world point, in fixed voxels
    target = (np.linalg.inv(canvas) @ np.c_[posed_world, np.ones(2)].T)[:3].T
    disp = np.zeros((3, *CANVAS), np.float32)
    for point, goal in zip(fixed.astype(int), target):
        disp[(slice(None), *point)] = goal - point
    assert landmarks.tre(disp, fixed, unposed, to_unposed({"world": world})) < 1e-3
    assert landmarks.tre(disp, fixed, unposed) > 10  # read as unposed, the same map is far off
