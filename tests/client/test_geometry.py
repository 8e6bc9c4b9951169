"""lumireg.client.geometry: any image onto the canvas, the canvas answer back onto the caller's grids."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from lumireg.client import geometry
from lumireg.client.geometry import (
    Placement,
    canvas_affine_for,
    field_to_fixed_grid,
    is_native,
    itk_image,
    to_canvas,
    warp_to_fixed,
)
from lumireg.contract import CANVAS

CENTRE = (np.array(CANVAS) - 1) / 2


@pytest.fixture
def np_rng(rng):
    """A numpy generator drawn from the project's per-test torch generator (replay with LUMIREG_TEST_SEED)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    return np.random.default_rng(seed), seed


def brain(points, phases, scale=1.0):
    """A smooth, asymmetric brain-like intensity at world points (3, ...) RAS mm: a textured ellipsoid."""
    x, y, z = points
    r = np.sqrt((x / 62) ** 2 + (y / 80) ** 2 + (z / 66) ** 2)
    envelope = 1 / (1 + np.exp((r - 1) * 10))
    texture = 1 + 0.3 * np.sin(x / 9 + phases[0]) * np.cos(y / 11 + phases[1]) + 0.2 * np.sin(z / 13 + phases[2])
    return (100 * envelope * texture * (1 + 0.003 * x) * scale).astype(np.float32)


def world(affine, shape):
    """World points (3, *shape) of every voxel of a grid."""
    ijk = np.mgrid[tuple(slice(0, n) for n in shape)].astype(np.float64)
    return np.einsum("ij,j...->i...", affine[:3, :3], ijk) + affine[:3, 3].reshape(3, 1, 1, 1)


def lps_cropped_image(np_rng, spacing=1.5, full=(120, 150, 140)):
    """The brain on a RAS grid, reoriented LPS (first two axes flipped) and cropped asymmetrically."""
    rng, _ = np_rng
    phases = rng.uniform(0, 2 * np.pi, 3)
    ras = np.diag([spacing, spacing, spacing, 1.0])
    ras[:3, 3] = -spacing * (np.array(full) - 1) / 2 + rng.uniform(-8, 8, 3)
    data_ras = brain(world(ras, full), phases)
    flip = np.array([[-1, 0, 0, full[0] - 1], [0, -1, 0, full[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    lps, data_lps = ras @ flip, data_ras[::-1, ::-1, :]
    lo, hi = rng.integers(3, 12, 3), rng.integers(14, 25, 3)  # asymmetric crop
    crop = np.eye(4)
    crop[:3, 3] = lo
    affine = lps @ crop
    data = np.ascontiguousarray(data_lps[lo[0] : full[0] - hi[0], lo[1] : full[1] - hi[1], lo[2] : full[2] - hi[2]])
    assert affine[0, 0] < 0 and affine[1, 1] < 0 and affine[2, 2] > 0
    np.testing.assert_allclose(data, brain(world(affine, data.shape), phases), atol=1e-3)  # the helper itself
    return data, affine, phases


def expected_canvas_affine(shape, affine, data=None):
    """Independent: the 1 mm RAS canvas whose centre voxel sits on the field of view's centre, or with ``data``
    on its centre of intensity mass (weights: the 0.5..99.5th percentiles mapped to 0..1)."""
    centre = (np.array(shape) - 1) / 2
    if data is not None:
        lo, hi = np.percentile(data, [0.5, 99.5])
        weights = np.clip((data - lo) / (hi - lo), 0, 1)
        mass = (np.indices(shape).reshape(3, -1) * weights.reshape(-1)).sum(1) / weights.sum()
        centre = centre + np.rint(mass - centre)  # whole voxels from the field of view's centre
    out = np.eye(4)
    out[:3, 3] = affine[:3, :3] @ centre + affine[:3, 3] - CENTRE
    return out


# 1. native images ---------------------------------------------------------------------------------------------------


def test_native_images_pass_through_unchanged(np_rng):
    rng, seed = np_rng
    data = rng.integers(0, 256, CANVAS, dtype=np.uint8)
    affine = np.eye(4)
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    assert is_native(data)
    assert not is_native(data.astype(np.float32)) and not is_native(data[:-1]) and not is_native(data.astype(np.int16))
    canvas, placement = to_canvas(data, affine)
    assert canvas is data and placement.native and placement.shape == CANVAS
    np.testing.assert_array_equal(placement.canvas_affine, affine)

    u = rng.normal(0, 3, (3, *CANVAS)).astype(np.float16)
    d = field_to_fixed_grid(u, placement, placement)
    assert d.dtype == np.float32 and d.shape == (3, *CANVAS)
    np.testing.assert_allclose(d, u.astype(np.float32), rtol=0, atol=1e-5, err_msg=f"seed {seed}")

    zero = np.zeros((3, *CANVAS), np.float32)
    warped = warp_to_fixed(data, zero, placement, placement)
    assert warped.dtype == np.float32
    np.testing.assert_array_equal(warped, data.astype(np.float32))
    labels = rng.integers(0, 40, CANVAS, dtype=np.int32)
    warped_labels = warp_to_fixed(labels, zero, placement, placement, labels=True)
    assert warped_labels.dtype == np.int32
    np.testing.assert_array_equal(warped_labels, labels)

    # pull-back: an integer shift s reads moving(x + s) at x, zero where x + s leaves the image
    s = rng.integers(-5, 6, 3)
    shifted = warp_to_fixed(
        labels,
        np.broadcast_to(s.reshape(3, 1, 1, 1), (3, *CANVAS)).astype(np.float32),
        placement,
        placement,
        labels=True,
    )
    padded = np.zeros([n + 12 for n in CANVAS], np.int32)
    padded[6:-6, 6:-6, 6:-6] = labels
    expected = padded[tuple(slice(6 + si, 6 + si + n) for si, n in zip(s, CANVAS))]
    np.testing.assert_array_equal(shifted, expected, err_msg=f"seed {seed}, shift {s}")


# 2. a non-native image: 1.5 mm, LPS, cropped ------------------------------------------------------------------------


def test_canvas_affine_centres_the_field_of_view(np_rng):
    rng, _ = np_rng
    affine = np.diag([-0.9, 1.3, 2.0, 1.0])
    affine[:3, 3] = rng.uniform(-90, 90, 3)
    shape = tuple(rng.integers(20, 300, 3))
    got = canvas_affine_for(shape, affine)
    np.testing.assert_allclose(got, expected_canvas_affine(shape, affine), atol=1e-9)
    np.testing.assert_allclose(got @ [*CENTRE, 1], affine @ [*((np.array(shape) - 1) / 2), 1], atol=1e-9)


def test_an_lps_cropped_image_lands_on_the_ras_canvas(np_rng):
    data, affine, phases = lps_cropped_image(np_rng)
    canvas, placement = to_canvas(data, affine)
    assert canvas.dtype == np.uint8 and canvas.shape == CANVAS and not placement.native
    np.testing.assert_allclose(placement.canvas_affine, expected_canvas_affine(data.shape, affine, data), atol=1e-4)
    lo, hi = np.percentile(data, [0.5, 99.5])
    expected = np.clip((brain(world(placement.canvas_affine, CANVAS), phases) - lo) / (hi - lo), 0, 1) * 255
    # canvas voxels well inside the image's field of view
    inside = np.all(
        [
            (c >= 1) & (c <= n - 2)
            for c, n in zip(world(np.linalg.inv(affine) @ placement.canvas_affine, CANVAS), data.shape)
        ],
        axis=0,
    )
    error = np.abs(canvas.astype(np.float64) - expected)[inside]
    assert error.mean() < 0.5 and error.max() < 2, (error.mean(), error.max(), np_rng[1])
    assert np.all(canvas[~inside & (expected < 1)] <= 1)
    # a wrongly oriented canvas (axes not flipped back to RAS) would not match
    assert np.abs(canvas.astype(np.float64) - expected[::-1, ::-1])[inside].mean() > 5


def test_the_same_image_with_zero_canvas_displacement_gives_zero(np_rng):
    data, affine, _ = lps_cropped_image(np_rng)
    _, placement = to_canvas(data, affine)
    d = field_to_fixed_grid(np.zeros((3, *CANVAS), np.float16), placement, placement)
    assert d.shape == (3, *data.shape) and d.dtype == np.float32
    assert np.abs(d).max() < 1e-4, np_rng[1]


def test_a_translated_moving_image_is_met_through_its_own_canvas(np_rng):
    rng, seed = np_rng
    data, affine, _ = lps_cropped_image(np_rng)
    t = rng.uniform(-20, 20, 3)
    shifted = affine.copy()
    shifted[:3, 3] += t
    _, fixed = to_canvas(data, affine)
    _, moving = to_canvas(data, shifted)
    d = field_to_fixed_grid(np.zeros((3, *CANVAS), np.float32), fixed, moving)
    # each canvas is centred on its own image, so canvas voxel c of one is world point p + t of the other:
    # d = inv(R) t, in fixed voxels (LPS at 1.5 mm: -t_x / 1.5, -t_y / 1.5, t_z / 1.5)
    expected = np.array([-t[0], -t[1], t[2]]) / 1.5
    np.testing.assert_allclose(
        d.reshape(3, -1).T, np.broadcast_to(expected, (d[0].size, 3)), atol=1e-4, err_msg=f"seed {seed}"
    )
    warped = warp_to_fixed(data, d, fixed, moving)  # the same content: the moving array read at the same voxel
    np.testing.assert_allclose(warped, data, atol=1e-3 * data.max(), err_msg=f"seed {seed}")


def expected_d(x, fixed, moving, u_of):
    """Independent: d at fixed voxels x (3, n), for the analytic canvas field u_of((3, n) canvas voxels)."""
    F = fixed.affine
    c = F[:3, :3] @ x + F[:3, 3:] - fixed.canvas_affine[:3, 3:]  # the canvas's place: its own test above
    clamped = np.clip(c, 0, np.array(CANVAS)[:, None] - 1)  # the canvas field's edge values beyond it
    c_moving = c + np.stack(np.broadcast_arrays(*u_of(*clamped)))
    q = c_moving + moving.canvas_affine[:3, 3:]
    return np.linalg.solve(F[:3, :3], q - F[:3, 3:]) - x


@pytest.mark.parametrize("kind", ["translation", "sinusoid"])
def test_a_known_canvas_field_maps_back_to_the_expected_displacement(np_rng, kind):
    rng, seed = np_rng
    # the fixed image's field of view (1.5 mm x 140 = 210 mm) overhangs the canvas along z: edge values there
    data, affine, _ = lps_cropped_image(np_rng, full=(110, 140, 175))
    _, fixed = to_canvas(data, affine)
    moving_affine = np.diag([1.2, 1.0, -1.1, 1.0])
    moving_affine[:3, 3] = rng.uniform(-90, -60, 3) * [1, 1, -1]
    moving = Placement((130, 170, 150), moving_affine, canvas_affine_for((130, 170, 150), moving_affine), False)
    if kind == "translation":
        shift = rng.uniform(-4, 4, 3)

        def u_of(c0, c1, c2):
            return shift[0] + 0 * c0, shift[1] + 0 * c1, shift[2] + 0 * c2

        tolerance = 1e-4
    else:
        a, phi, wavelength = rng.uniform(1, 3, 3), rng.uniform(0, 2 * np.pi, 3), rng.uniform(35, 50, 3)

        def u_of(c0, c1, c2):
            w = 2 * np.pi / wavelength
            return (
                a[0] * np.sin(w[0] * c1 + phi[0]) * np.cos(w[1] * c2),
                a[1] * np.sin(w[1] * c2 + phi[1]) * np.cos(w[2] * c0),
                a[2] * np.sin(w[2] * c0 + phi[2]) * np.cos(w[0] * c1),
            )

        tolerance = 0.03  # trilinear interpolation of the sinusoid on the canvas grid
    grid = np.ogrid[0 : CANVAS[0], 0 : CANVAS[1], 0 : CANVAS[2]]
    canvas_disp = np.stack([np.broadcast_to(comp, CANVAS) for comp in u_of(*grid)]).astype(np.float32)
    d = field_to_fixed_grid(canvas_disp, fixed, moving)
    x = np.stack([rng.integers(0, n, 400) for n in data.shape])
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in data.shape], indexing="ij")).reshape(3, -1)
    x = np.concatenate([x, corners], axis=1)
    got = d[:, x[0], x[1], x[2]]
    want = expected_d(x.astype(np.float64), fixed, moving, u_of)
    assert np.abs(got - want).max() < tolerance, (np.abs(got - want).max(), seed)
    assert np.abs(want).max() > 1  # not a trivial field


# 3. intensities and rejections -------------------------------------------------------------------------------------


def test_intensities_use_the_percentiles_of_the_whole_original_image(np_rng):
    rng, seed = np_rng
    shape = (200, 50, 60)  # even sizes at 1 mm: canvas voxels fall on image voxels; axis 0 overhangs by 20 each side
    data = rng.normal(-30, 40, shape)
    data[:20] += 500  # a bright slab at one end: it sets the percentiles (and pulls the centre of mass)
    data.flat[rng.choice(data.size, 1000, replace=False)] = np.nan
    canvas, placement = to_canvas(data, np.eye(4))
    lo, hi = np.nanpercentile(data, [0.5, 99.5])
    assert hi > 400  # the slab's doing
    mapped = np.rint(np.clip((np.nan_to_num(data, nan=0.0) - lo) / (hi - lo), 0, 1) * 255)
    shift = placement.canvas_affine[:3, 3]  # canvas voxel c is image voxel c + shift: whole voxels
    np.testing.assert_array_equal(shift, np.rint(shift))
    shift = shift.astype(int)
    first, stop = np.maximum(0, -shift), np.minimum(CANVAS, np.array(shape) - shift)
    inside = tuple(slice(a, b) for a, b in zip(first, stop))
    window = canvas[inside]
    part = tuple(slice(a + t, b + t) for a, b, t in zip(first, stop, shift))
    diff = np.abs(window.astype(np.float64) - mapped[part])
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean(), seed)
    nans = np.isnan(data[part])
    assert np.all(np.abs(window[nans].astype(float) - np.rint(-lo / (hi - lo) * 255)) <= 1)  # NaN -> 0 -> grey
    outside = np.ones(CANVAS, bool)
    outside[inside] = False
    assert np.all(canvas[outside] == 0)  # outside the field of view 0, although lo < 0


def test_uint8_percentiles_and_clipping(np_rng):
    rng, seed = np_rng
    data = rng.gamma(2.0, 30.0, (80, 90, 70)).astype(np.float32)
    canvas, _ = to_canvas(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    assert canvas.dtype == np.uint8
    window = canvas[40:120, 67:157, 61:131]
    assert window.shape == data.shape
    # the canvas grid falls on the image's voxels here, so the window is the intensity map itself
    lo, hi = np.percentile(data, [0.5, 99.5])
    expected = np.clip(np.rint((data.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255)
    assert np.abs(window.astype(np.int64) - expected).max() <= 1, seed
    # 0.5 % of the voxels lie above the 99.5th percentile: saturated at 255; as many below the 0.5th, at 0, and
    # those within half a grey level of either end round onto it as well
    for end, percentile_side in ((255, data > hi), (0, data < lo)):
        assert percentile_side.mean() <= (window == end).mean() <= percentile_side.mean() + 0.003, (end, seed)


@pytest.mark.parametrize(
    "data, message",
    [
        (np.ones((10, 10, 10)), "constant"),
        (np.zeros((10, 10, 10), np.int16), "constant"),
        (np.full((10, 10, 10), np.nan), "no finite"),
        (np.zeros(CANVAS, np.uint8), "constant"),
        (np.random.default_rng(0).random((10, 10, 10, 2)), "3-D"),
        (np.random.default_rng(0).random((10, 10)), "3-D"),
        (np.zeros((0, 10, 10)), "3-D"),
    ],
)
def test_bad_images_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        to_canvas(data, np.eye(4))


@pytest.mark.parametrize(
    "affine, message",
    [
        (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
        (np.full((4, 4), np.nan), "finite"),
        (np.eye(3), "4x4"),
    ],
)
def test_bad_affines_are_refused(affine, message):
    with pytest.raises(ValueError, match=message):
        to_canvas(np.random.default_rng(0).random((10, 10, 10)), affine)


# 4. sub-millimetre input --------------------------------------------------------------------------------------------


def test_sub_millimetre_images_are_smoothed_before_resampling():
    shape = (101, 121, 111)  # at 0.5 mm every canvas voxel lands on an image voxel of the same checker parity
    checkers = (np.indices(shape).sum(axis=0) % 2).astype(np.float32)
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    canvas, placement = to_canvas(checkers, affine)
    source = world(np.linalg.inv(affine) @ placement.canvas_affine, CANVAS)
    assert np.allclose(source, np.rint(source))  # so plain resampling would alias to all 0 or all 255
    inside = np.all([(c >= 3) & (c <= n - 4) for c, n in zip(source, shape)], axis=0)
    assert inside.sum() > 40**3
    assert np.abs(canvas[inside].astype(float) - 127.5).max() <= 3


# 5. the ITK / ANTs displacement field -------------------------------------------------------------------------------


def test_the_itk_field_warps_like_we_do_in_ants(np_rng, tmp_path):
    ants = pytest.importorskip("ants")
    rng, seed = np_rng
    fixed_shape, moving_shape = (56, 64, 52), (60, 66, 58)
    fixed_affine = np.diag([-1.2, -1.2, 1.2, 1.0])  # LPS
    fixed_affine[:3, 3] = np.array([33.0, 38.0, -30.0]) + rng.uniform(-3, 3, 3)
    moving_affine = np.diag([1.2, 1.1, -1.25, 1.0])  # R, A, I
    moving_affine[:3, 3] = np.array([-35.0, -36.0, 36.0]) + rng.uniform(-3, 3, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    fixed_data = brain(world(fixed_affine, fixed_shape), phases, scale=0.5)
    moving_data = brain(world(moving_affine, moving_shape), phases + 1)
    fixed = Placement(fixed_shape, fixed_affine, canvas_affine_for(fixed_shape, fixed_affine), False)
    moving = Placement(moving_shape, moving_affine, canvas_affine_for(moving_shape, moving_affine), False)

    i, j, k = np.indices(fixed_shape)
    a = rng.uniform(1, 3, 3)
    d = np.stack(
        [a[0] * np.sin(j / 7 + phases[0]), a[1] * np.cos(k / 8 + i / 13), a[2] * np.sin(i / 6) * np.cos(j / 9)]
    ).astype(np.float32)
    ours = warp_to_fixed(moving_data, d, fixed, moving)

    nib.save(nib.Nifti1Image(fixed_data, fixed_affine), tmp_path / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(moving_data, moving_affine), tmp_path / "moving.nii.gz")
    field = itk_image(d, fixed_affine, nib.Nifti1Image(fixed_data, fixed_affine).header)
    assert field.shape == (*fixed_shape, 1, 3) and field.header.get_intent()[0] == "vector"
    nib.save(field, tmp_path / "field.nii.gz")
    theirs = ants.apply_transforms(
        fixed=ants.image_read(str(tmp_path / "fixed.nii.gz")),
        moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
        transformlist=[str(tmp_path / "field.nii.gz")],
        interpolator="linear",
    ).numpy()
    assert theirs.shape == fixed_shape
    coords = geometry.moving_coordinates(d, fixed, moving)
    interior = np.all([(c >= 1) & (c <= n - 2) for c, n in zip(coords, moving_shape)], axis=0)
    assert interior.mean() > 0.5
    span = moving_data.max() - moving_data.min()
    difference = np.abs(theirs - ours)[interior].max() / span
    print(f"ITK vs ours: max |difference| = {difference:.2e} of the intensity range (seed {seed})")
    assert difference < 1e-3, (difference, seed)
    # a field left in RAS (x, y not negated) would not pass
    assert np.abs(ours - warp_to_fixed(moving_data, np.zeros_like(d), fixed, moving))[interior].max() / span > 0.05


def test_the_module_needs_no_torch():
    probe = "import sys, lumireg.client.geometry; print(sorted({'torch', 'triton'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_an_off_centre_head_is_placed_on_the_canvas_around_its_centre_of_mass():
    # a 300 mm field of view with the head 70 mm off its centre: centring on the field of view would cut it off
    data = np.zeros((300, 240, 200), np.float32)
    i, j, k = np.ogrid[:300, :240, :200]
    head = ((i - 220) / 65.0) ** 2 + ((j - 120) / 85.0) ** 2 + ((k - 100) / 70.0) ** 2 <= 1
    data[head] = 100.0
    canvas, placement = to_canvas(data, np.eye(4))
    np.testing.assert_allclose(placement.canvas_affine @ [*CENTRE, 1], [220, 120, 100, 1], atol=0.5)
    assert canvas.sum() >= 0.99 * 255 * head.sum()  # the whole head on the canvas
    edges = [canvas[0], canvas[-1], canvas[:, 0], canvas[:, -1], canvas[:, :, 0], canvas[:, :, -1]]
    assert max(edge.max() for edge in edges) == 0
