"""The LUMIR metrics on hand-built fields with answers derived by hand; NDV against a loop oracle, HD95 against a
brute-force surface-distance oracle."""

import itertools

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.spatial.distance import cdist
from surface_distance import lookup_tables

from lumireg.evaluate import metrics

SHAPE = (16, 14, 12)
# two cubes of different labels, at least 3 voxels from the low faces: (label, corner, side)
CUBES = [(1, (6, 3, 3), 4), (2, (5, 8, 5), 5)]
LANDMARKS = {1: (4, 5, 6), 2: (9, 10, 4), 3: (12, 6, 8)}


def translation(vector, shape=SHAPE) -> np.ndarray:
    """A constant ``[D, H, W, 3]`` field."""
    return np.broadcast_to(np.asarray(vector, np.float64), shape + (3,)).copy()


def cube_labels(shape=SHAPE) -> np.ndarray:
    out = np.zeros(shape)
    for label, corner, side in CUBES:
        out[tuple(slice(c, c + side) for c in corner)] = label
    return out


def landmark_volume(shape=SHAPE) -> np.ndarray:
    """Each landmark a two-voxel blob; its centroid sits half a voxel past LANDMARKS along axis 2."""
    out = np.zeros(shape)
    for label, (i, j, k) in LANDMARKS.items():
        out[i, j, k : k + 2] = label
    return out


def linear_field(matrix, shape=SHAPE) -> np.ndarray:
    """``u(x) = (M - I) x``, so the transform is ``x -> M x``."""
    grid = np.indices(shape, dtype=np.float64)
    return np.einsum("ca,a...->...c", np.asarray(matrix, np.float64) - np.eye(3), grid)


# --- translations: every metric has a closed form -------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_translated_cube_scores_the_analytic_overlap_and_distance(axis, k):
    labels = cube_labels()
    disp = translation(np.eye(3)[axis] * k)
    warped = metrics.warp_labels_nearest(labels, disp)
    # the cube moves by -k along the axis: overlap (side - k) / side, surfaces k apart
    expected_dice = [(side - k) / side for _, _, side in CUBES]
    np.testing.assert_allclose(metrics.dice(labels, warped, [1, 2], labels), expected_dice)
    np.testing.assert_array_equal(metrics.hd95(labels, warped, [1, 2], labels), [k, k])


def test_translation_has_no_folding_and_unit_jacobian():
    disp = translation([2.5, -1.25, 0.75])
    assert metrics.ndv_percent(disp) == 0.0
    np.testing.assert_array_equal(metrics.jacobian_determinant(disp), 1.0)
    assert metrics.sdlogj(disp) == 0.0
    dets = metrics.digital_jacobians(disp)
    assert len(dets) == 10 and dets[0].shape == tuple(n - 2 for n in SHAPE)
    # 6 x the tetrahedron volumes: 1/6 for the 8 corner ones, 1/3 for the 2 central ones
    for j, volume in zip(dets, [1 / 6] * 8 + [1 / 3] * 2):
        np.testing.assert_allclose(j, 6 * volume)


@pytest.mark.parametrize("vector", [(2, 0, 0), (0, -3, 0), (2, 1, -2)])
def test_tre_of_a_translation_is_its_length(vector):
    fixed = landmark_volume()
    warped = metrics.warp_labels_nearest(fixed, translation(vector))
    np.testing.assert_allclose(metrics.landmark_distances(fixed, warped), np.linalg.norm(vector))
    assert metrics.tre(fixed, warped) == pytest.approx(np.linalg.norm(vector))


def test_identity_scores_perfectly():
    labels, landmarks, disp = cube_labels(), landmark_volume(), translation([0, 0, 0])
    warped = metrics.warp_labels_nearest(labels, disp)
    np.testing.assert_array_equal(warped, labels)
    np.testing.assert_array_equal(metrics.dice(labels, warped, [0, 1, 2], labels), 1.0)
    np.testing.assert_array_equal(metrics.hd95(labels, warped, [0, 1, 2], labels), 0.0)
    assert metrics.tre(landmarks, metrics.warp_labels_nearest(landmarks, disp)) == 0.0
    assert metrics.ndv_percent(disp) == 0.0


def test_nearest_warp_reads_zero_outside_and_rounds_to_the_nearest_voxel():
    labels = cube_labels()
    warped = metrics.warp_labels_nearest(labels, translation([3.4, 0, 0]))
    expected = np.zeros_like(labels)
    expected[:-3] = labels[3:]
    np.testing.assert_array_equal(warped, expected)


# --- absent labels ------------------------------------------------------------------------------------------


def test_labels_absent_from_fixed_or_moving_are_nan_and_skipped_by_the_mean():
    fixed = cube_labels()
    moving = fixed.copy()
    moving[moving == 2] = 0  # label 2 only in fixed; label 9 nowhere
    warped = metrics.warp_labels_nearest(moving, translation([1, 0, 0]))
    d = metrics.dice(fixed, warped, [1, 2, 9], moving)
    h = metrics.hd95(fixed, warped, [1, 2, 9], moving)
    assert d[0] == pytest.approx(3 / 4) and np.isnan(d[1:]).all()
    assert h[0] == 1.0 and np.isnan(h[1:]).all()
    assert np.nanmean(d) == pytest.approx(3 / 4)


def test_label_warped_out_of_view_scores_dice_0_and_infinite_hd95():
    labels = cube_labels()
    warped = metrics.warp_labels_nearest(labels, translation([20, 0, 0]))
    assert metrics.dice(labels, warped, [1], labels)[0] == 0.0
    assert metrics.hd95(labels, warped, [1], labels)[0] == np.inf
    assert np.isnan(
        metrics.tre(landmark_volume(), metrics.warp_labels_nearest(landmark_volume(), translation([20, 0, 0])))
    )


def test_non_integer_labels_are_refused():
    with pytest.raises(ValueError, match="integer labels"):
        metrics.dice(cube_labels() + 0.5, cube_labels(), [1])


# --- HD95 against a brute-force oracle ---------------------------------------------------------------------------

# the area of the marching-cubes patch of each 2x2x2 configuration (unit spacing), and the configuration's bit of
# each of its 8 voxels: the official evaluator's surface-distance package weighs every surface point by it
PATCH_AREA = lookup_tables.create_table_neighbour_code_to_surface_area(np.ones(3))
VOXEL_BIT = 2 ** np.arange(7, -1, -1).reshape(2, 2, 2)


def surfels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-corner points whose 8 voxels (outside the volume: out) are mixed: ``[N, 3]`` coordinates, ``[N]`` areas."""
    cubes = sliding_window_view(np.pad(mask, 1).astype(np.int64), (2, 2, 2))  # cubes[q]: voxels q-1 .. q
    inside = cubes.sum(axis=(-3, -2, -1))
    points = (inside > 0) & (inside < 8)
    codes = (cubes * VOXEL_BIT).sum(axis=(-3, -2, -1))
    return np.argwhere(points).astype(np.float64), PATCH_AREA[codes[points]]


def directed_p95(source: tuple, target: tuple) -> float:
    """The smallest distance d such that the source's points within d of the target carry >= 95 % of its area."""
    (points, areas), (to, _) = source, target
    if len(points) == 0 or len(to) == 0:
        return np.inf
    distance = cdist(points, to).min(axis=1)
    return min(d for d in np.unique(distance) if areas[distance <= d].sum() >= 0.95 * areas.sum())


def reference_hd95(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, labels: list[int]) -> np.ndarray:
    out = []
    for label in labels:
        if not ((fixed == label).any() and (moving == label).any()):
            out.append(np.nan)
            continue
        f, w = surfels(fixed == label), surfels(warped == label)
        out.append(max(directed_p95(f, w), directed_p95(w, f)))
    return np.array(out)


def box(shape, corner, size, label=1, out=None) -> np.ndarray:
    out = np.zeros(shape) if out is None else out
    out[tuple(slice(c, c + n) for c, n in zip(corner, size))] = label
    return out


def ball(shape, centre, radii, label=1, out=None) -> np.ndarray:
    out = np.zeros(shape) if out is None else out
    grid = np.indices(shape, dtype=np.float64)
    out[sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1] = label
    return out


def hd95_pairs():
    """(fixed, moving, warped, labels) cases: small, split, elongated, round and missing labels."""
    s = (24, 24, 24)
    small = box(s, (5, 5, 5), (1, 1, 2)), box(s, (6, 5, 4), (1, 2, 2))  # 2 voxels vs 4, one voxel off
    split_fixed = box(s, (14, 14, 14), (2, 2, 2), out=box(s, (3, 3, 3), (6, 6, 6)))  # a big blob and a small one
    split_warped = box(s, (17, 12, 15), (2, 2, 2), out=box(s, (3, 4, 3), (6, 5, 6)))
    rod = box((32, 20, 20), (4, 8, 8), (22, 3, 4)), box((32, 20, 20), (5, 9, 8), (20, 3, 5))
    sphere = ball((28, 28, 28), (13.5, 13.5, 13.5), (8, 8, 8))
    ellipsoid = ball((28, 28, 28), (14, 14, 14), (11, 8, 7))
    two = cube_labels()  # labels 0 (background, touching the border), 1, 2; 2 also warped out of view; 3 nowhere
    two_warped = metrics.warp_labels_nearest(two, translation([2, 1, 0]))
    two_warped[two_warped == 2] = 0
    only_warped = cube_labels()  # label 2 missing from fixed, but in moving and warped
    only_warped[only_warped == 2] = 0
    return {
        "small": (small[0], small[0], small[1], [1]),
        "two_blobs": (split_fixed, split_fixed, split_warped, [1]),
        "elongated_box": (rod[0], rod[0], rod[1], [1]),
        "sphere_vs_ellipsoid": (sphere, sphere, ellipsoid, [1]),
        "missing_in_warped_or_everywhere": (two, two, two_warped, [0, 1, 2, 3]),
        "missing_in_fixed": (only_warped, two, metrics.warp_labels_nearest(two, translation([2, 1, 0])), [0, 1, 2]),
    }


@pytest.mark.parametrize("case", list(hd95_pairs()))
def test_hd95_is_the_area_weighted_95th_percentile_of_the_surface_distances(case):
    fixed, moving, warped, labels = hd95_pairs()[case]
    expected = reference_hd95(fixed, moving, warped, labels)
    assert np.isfinite(expected).any(), "each case should score some label"
    np.testing.assert_allclose(metrics.hd95(fixed, warped, labels, moving), expected, rtol=1e-12)


def test_hd95_weighs_surface_points_by_area_so_a_tiny_fragment_does_not_count():
    # a 4-voxel cube in both maps, and in the fixed map one more voxel of the label far away: its 8 corner points
    # are 8 of 106 (7.5 %, so an equal-weight 95th percentile would be their distance), but their area is
    # 8 * sqrt(3)/8 of 6 * 9 + 12 * 3 * sqrt(2)/2 + 8 * sqrt(3)/8 + sqrt(3) (2.1 %, faces 1, edges sqrt(2)/2,
    # corners sqrt(3)/8 each)
    shape = (24, 24, 24)
    warped = box(shape, (4, 4, 4), (4, 4, 4))
    fixed = box(shape, (18, 18, 18), (1, 1, 1), out=warped.copy())
    assert PATCH_AREA[128] == pytest.approx(np.sqrt(3) / 8) and PATCH_AREA[128 + 64] == pytest.approx(np.sqrt(2) / 2)
    assert PATCH_AREA[128 + 64 + 32 + 16] == pytest.approx(1.0)
    assert metrics.hd95(fixed, warped, [1], fixed)[0] == 0.0
    # a 2x2x2 fragment has 16 % of the area: now the percentile reaches it
    fixed = box(shape, (18, 18, 18), (2, 2, 2), out=warped.copy())
    assert metrics.hd95(fixed, warped, [1], fixed)[0] > 10


# --- layouts -------------------------------------------------------------------------------------------------


def test_channels_first_fields_are_refused_until_converted():
    disp = translation([1, 0, 0])
    first = np.moveaxis(disp, -1, 0)
    with pytest.raises(ValueError, match="as_channels_last"):
        metrics.ndv_percent(first)
    np.testing.assert_array_equal(metrics.as_channels_last(first), disp)


# --- folds: counted by hand ------------------------------------------------------------------------------------


def mirrored_slab(depth: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Rows 4, 5, 6 of axis 0 mapped to 6, 5, 4: phi = 0 1 2 3 6 5 4 7 8 ...; returns (disp, phi)."""
    phi = np.arange(depth, dtype=np.float64)
    phi[4:7] = phi[4:7][::-1]
    disp = translation([0, 0, 0], (depth, 7, 6))
    disp[..., 0] = (phi - np.arange(depth))[:, None, None]
    return disp, phi


def test_mirrored_slab_folds_the_volume_counted_by_hand():
    disp, phi = mirrored_slab()
    rows = np.arange(1, len(phi) - 1)
    # along a 1-D fold only axis 0 bends: one-sided J = forward F or backward B difference of phi,
    # J*_1 = 2B and J*_2 = 2F (expand the determinants of the offsets -e0-e1, ... with phi in the first slot)
    forward, backward = phi[rows + 1] - phi[rows], phi[rows] - phi[rows - 1]
    expected = [forward if s0 > 0 else backward for s0 in (1, 1, 1, 1, -1, -1, -1, -1)] + [2 * backward, 2 * forward]
    for j, e in zip(metrics.digital_jacobians(disp), expected):
        np.testing.assert_array_equal(j, np.broadcast_to(e[:, None, None], j.shape))
    # per column: row 4 (F = -1) folds 1/2, row 5 (F = B = -1) folds 1, row 6 (B = -1) folds 1/2
    depth = len(phi)
    assert metrics.ndv_percent(disp) == pytest.approx(2 / (depth - 2) * 100)
    mask = np.zeros(disp.shape[:3])
    mask[5] = 1
    assert metrics.ndv_percent(disp, mask) == pytest.approx(100.0)
    mask[4:7] = 1
    assert metrics.ndv_percent(disp, mask) == pytest.approx(2 / 3 * 100)
    mask[:] = 0
    mask[8:] = 1
    assert metrics.ndv_percent(disp, mask) == 0.0
    # central differences see the fold in row 5 only: (phi[6] - phi[4]) / 2 = -1
    jac = metrics.jacobian_determinant(disp)
    assert np.array_equal(np.unique(np.nonzero(jac <= 0)[0]), [5]) and np.all(jac[5] == -1)


def test_linear_map_with_negative_determinant_folds_its_determinant_in_percent(np_rng):
    matrix = np_rng.normal(size=(3, 3)) + 2 * np.eye(3)
    if np.linalg.det(matrix) > 0:
        matrix[0] *= -1
    disp = linear_field(matrix)
    det = np.linalg.det(matrix)
    # every tetrahedron is scaled by det(M): each voxel folds |det M| (8/12 + 2 * 2/12 of it)
    assert metrics.ndv_percent(disp) == pytest.approx(-det * 100, rel=1e-9)
    np.testing.assert_allclose(metrics.jacobian_determinant(disp), det, rtol=1e-9)
    assert metrics.ndv_percent(linear_field(np.diag([1.2, 0.8, 1.1]))) == 0.0
    assert metrics.ndv_percent(linear_field(np.diag([-1.0, 1, 1]))) == pytest.approx(100.0)


@pytest.mark.parametrize("c", [0.1, -0.2])
def test_sdlogj_of_a_quadratic_field_is_the_std_over_its_rows(c):
    # u0 = c x0^2 / 2: central differences give J = 1 + c i exactly; rows 2 .. D-3 count, J clipped at 1e-9
    disp = translation([0, 0, 0])
    disp[..., 0] = (c * np.arange(SHAPE[0]) ** 2 / 2)[:, None, None]
    rows = np.arange(2, SHAPE[0] - 2)
    expected = np.log(np.clip(1 + c * rows, 1e-9, None)).std()
    assert metrics.sdlogj(disp) == pytest.approx(expected, rel=1e-9)
    mask = np.zeros(SHAPE)
    mask[:5] = 1  # rows 2, 3, 4 after the crop
    assert metrics.sdlogj(disp, mask) == pytest.approx(np.log(np.clip(1 + c * rows[:3], 1e-9, None)).std(), rel=1e-9)


# --- NDV against a loop over tetrahedra ---------------------------------------------------------------------

# vertex offsets of the 10 tetrahedra at p: the 8 corner ones (one axis step each, signs s), then the 2 central ones
TETRAHEDRA = [tuple(np.diag(s)) for s in itertools.product((1, -1), repeat=3)] + [
    ((-1, -1, 0), (-1, 0, -1), (0, -1, -1)),
    ((1, 1, 0), (0, 1, 1), (1, 0, 1)),
]


def loop_jacobians(disp: np.ndarray) -> np.ndarray:
    """6 x the signed volume of each tetrahedron under T = x + u, oriented so the identity is positive."""
    size = disp.shape[:3]
    out = np.zeros((10,) + tuple(n - 2 for n in size))
    for p in itertools.product(*[range(1, n - 1) for n in size]):
        for t, vertices in enumerate(TETRAHEDRA):
            edges = [np.add(v, disp[tuple(np.add(p, v))]) - disp[p] for v in vertices]
            out[(t,) + tuple(np.subtract(p, 1))] = np.linalg.det(edges) * np.sign(np.linalg.det(vertices))
    return out


def test_ndv_matches_a_loop_over_tetrahedra_on_a_random_smooth_field(np_rng):
    size = (7, 8, 9)
    disp = np.stack([ndimage.gaussian_filter(np_rng.normal(size=size), 1.0) for _ in range(3)], -1) * 6
    mask = np_rng.random(size) > 0.3
    reference = loop_jacobians(disp)
    np.testing.assert_allclose(np.stack(metrics.digital_jacobians(disp)), reference, rtol=1e-10, atol=1e-10)
    inside = mask[1:-1, 1:-1, 1:-1]
    expected = (0.5 * np.maximum(-reference, 0) / 6).sum(0)[inside].sum() / inside.sum() * 100
    assert expected > 0, "the field should fold somewhere for this test to mean something"
    assert metrics.ndv_percent(disp, mask) == pytest.approx(expected, rel=1e-10)
    assert metrics.ndv_percent(disp) == pytest.approx((0.5 * np.maximum(-reference, 0) / 6).sum() / inside.size * 100)


def test_ndv_slabs_cover_every_row_once(np_rng):
    # deeper than one slab, with a depth that leaves a partial last slab
    size = (21, 5, 6)
    disp = np.stack([ndimage.gaussian_filter(np_rng.normal(size=size), 1.0) for _ in range(3)], -1) * 6
    folded = sum(np.maximum(-j, 0) for j in loop_jacobians(disp)).sum() * 0.5 / 6
    assert metrics.ndv_percent(disp) == pytest.approx(folded / np.prod([n - 2 for n in size]) * 100, rel=1e-10)


def test_torch_tensors_give_the_numpy_values_on_their_device(np_rng, triton_device):
    """The service's QC runs these metrics on the field's device; they must equal the evaluator's numpy values."""
    import torch

    size = (21, 8, 9)  # more than one NDV slab
    disp = np.stack([ndimage.gaussian_filter(np_rng.normal(size=size), 1.0) for _ in range(3)], -1) * 6
    mask = np_rng.random(size) > 0.3
    as_tensor = lambda a: torch.from_numpy(a).to(triton_device)  # noqa: E731
    expected = metrics.ndv_percent(disp, mask)
    assert expected > 0
    assert metrics.ndv_percent(as_tensor(disp), as_tensor(mask)) == pytest.approx(expected, rel=1e-12)
    assert metrics.ndv_percent(as_tensor(disp)) == pytest.approx(metrics.ndv_percent(disp), rel=1e-12)
    jacobian = metrics.jacobian_determinant(as_tensor(disp.astype(np.float32)))
    assert jacobian.device.type == torch.device(triton_device).type and jacobian.dtype == torch.float64
    np.testing.assert_allclose(
        jacobian.cpu().numpy(), metrics.jacobian_determinant(disp.astype(np.float32)), rtol=1e-12, atol=1e-12
    )
