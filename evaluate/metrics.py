"""The LUMIR metrics on numpy arrays: Dice, HD95, TRE, NDV, SDlogJ.

Conventions (LUMIR's, as the official evaluator reads its files): a
displacement field ``disp`` is ``[D, H, W, 3]`` (the NIfTI file layout; use
:func:`as_channels_last` for ``[3, D, H, W]``), any float dtype, in **voxel
units**, pull-back from the fixed grid: the warped moving image at voxel x is
``moving(x + disp[x])``, channel c along array axis c, voxel centres at
integer coordinates. Label maps are ``[D, H, W]`` of non-negative integer
values (any dtype, e.g. the float64 of ``get_fdata()``). Distances are in
voxels: HD95 is DeepMind's ``surface_distance`` with the unit spacing
``np.ones(3)`` that the official evaluator passes (LUMIR's canvas is 1 mm
isotropic, so also mm). numpy + scipy, and surface-distance (itself numpy +
scipy) for HD95.
"""

from __future__ import annotations

import warnings

import numpy as np
import surface_distance
from scipy import ndimage

# the 8 one-sided stencils: +1 forward, -1 backward difference along each axis
_ONE_SIDED = [(s0, s1, s2) for s0 in (1, -1) for s1 in (1, -1) for s2 in (1, -1)]
# the 2 tetrahedra inside the cube (Liu et al.'s J*_1, J*_2): vertex offsets from p
_CENTRAL = [((-1, -1, 0), (-1, 0, -1), (0, -1, -1)), ((1, 1, 0), (0, 1, 1), (1, 0, 1))]
_SLAB = 8  # rows of the field per NDV slab
_UNIT_SPACING = np.ones(3)  # LUMIR's evaluator passes np.ones(3): HD95 in voxels


def as_channels_last(disp: np.ndarray) -> np.ndarray:
    """``[3, D, H, W]`` (the network's layout) -> ``[D, H, W, 3]`` (the file layout every metric takes); a view."""
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise ValueError(f"expected a [3, D, H, W] displacement field, got shape {disp.shape}")
    return np.moveaxis(disp, 0, -1)


def _check_disp(disp: np.ndarray) -> np.ndarray:
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise ValueError(
            f"expected a [D, H, W, 3] displacement field, got shape {disp.shape} "
            "(as_channels_last converts [3, D, H, W])"
        )
    return disp


def _label_map(labels: np.ndarray, name: str) -> np.ndarray:
    """Integer copy of a label map; bincount and find_objects need non-negative ints."""
    out = np.rint(labels).astype(np.int64)
    if out.size and (out.min() < 0 or not np.array_equal(out, labels)):
        raise ValueError(f"{name} must hold non-negative integer labels")
    return out


def warp_labels_nearest(labels: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Warp a label (or landmark-label) volume onto the fixed grid, nearest neighbour.

    ``out[x] = labels(x + disp[x])`` by ``scipy.ndimage.map_coordinates(order=0)``
    with its defaults ``mode='constant', cval=0`` (outside the volume reads
    label 0), sample coordinates built in float64, exactly as the official
    LUMIR evaluator does.

    Args:
        labels: ``[D, H, W]`` moving label map, any dtype.
        disp: ``[D, H, W, 3]`` displacement in voxels on the same grid.

    Returns:
        ``[D, H, W]``, ``labels``' dtype.
    """
    disp = _check_disp(disp)
    coords = np.indices(labels.shape, dtype=np.float64) + np.moveaxis(disp, -1, 0)
    return ndimage.map_coordinates(labels, coords, order=0)


def _present(volume: np.ndarray, labels: list[int]) -> np.ndarray:
    counts = np.bincount(volume.ravel(), minlength=max(labels, default=0) + 1)
    return counts[labels] > 0


def dice(
    fixed_labels: np.ndarray, warped_labels: np.ndarray, labels: list[int], moving_labels: np.ndarray | None = None
) -> np.ndarray:
    """Dice overlap ``2|F∩W| / (|F| + |W|)`` per listed label.

    NaN where the label is absent from the fixed map, or from the moving map
    before warping (``moving_labels``, as the official evaluator checks; when
    it is not given, the warped map stands in for it). A label that was
    present in the moving map but warped out of view scores 0. The case value
    is ``np.nanmean`` of the result.

    Args:
        fixed_labels, warped_labels, moving_labels: ``[D, H, W]`` label maps.
        labels: the label values to score (LUMIR lists 0, background, too).

    Returns:
        ``[len(labels)]`` float64.
    """
    labels = [int(v) for v in labels]
    fixed, warped = _label_map(fixed_labels, "fixed_labels"), _label_map(warped_labels, "warped_labels")
    moving = warped if moving_labels is None else _label_map(moving_labels, "moving_labels")
    size = max(labels, default=0) + 1
    n_fixed = np.bincount(fixed.ravel(), minlength=size)[labels]
    n_warped = np.bincount(warped.ravel(), minlength=size)[labels]
    n_both = np.bincount(fixed[fixed == warped], minlength=size)[labels]
    valid = (n_fixed > 0) & _present(moving, labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, 2.0 * n_both / (n_fixed + n_warped), np.nan)


def _label_box(label: int, found: list[list], shape: tuple[int, ...]) -> tuple:
    """Bounding box of the label in either map (``find_objects`` slices); the whole volume for label 0."""
    parts = [f[label - 1] for f in found if 0 < label <= len(f) and f[label - 1] is not None]
    if not parts:
        return tuple(slice(0, n) for n in shape)
    return tuple(slice(min(p[a].start for p in parts), max(p[a].stop for p in parts)) for a in range(len(shape)))


def _robust_hausdorff_95(fixed_mask: np.ndarray, warped_mask: np.ndarray) -> float:
    """HD95 of two boolean masks, in voxels: DeepMind ``surface_distance``, unit spacing, as LUMIR scores it.

    ``compute_robust_hausdorff(compute_surface_distances(fixed, warped,
    spacing_mm=(1, 1, 1)), 95)``: surface elements on the voxel-corner grid
    (each 2x2x2 neighbourhood that is neither all in nor all out, outside the
    array counting as out), each weighted by the area of its marching-cubes
    surface patch; per direction the distance (``distance_transform_edt``) of
    every surface element to the other surface, sorted, and the first one
    whose cumulative share of the surface area reaches 95 % (no
    interpolation); the larger of the two directions. ``inf`` when either mask
    is empty.

    Args:
        fixed_mask, warped_mask: ``[D, H, W]`` bool, the same grid.

    Returns:
        float, voxels (LUMIR's 1 mm canvas: also mm).
    """
    with warnings.catch_warnings():
        # surface-distance 0.1 reaches correlate/distance_transform_edt through scipy's deprecated submodules
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = surface_distance.compute_surface_distances(fixed_mask, warped_mask, _UNIT_SPACING)
    return float(surface_distance.compute_robust_hausdorff(distances, 95.0))


def hd95(
    fixed_labels: np.ndarray, warped_labels: np.ndarray, labels: list[int], moving_labels: np.ndarray | None = None
) -> np.ndarray:
    """Robust (95th percentile) Hausdorff distance per listed label, in voxels.

    The official LUMIR evaluator's ``compute_hd95``: NaN where the label is
    absent from the fixed map or from the moving map before warping
    (``moving_labels``; when it is not given, the warped map stands in for
    it); otherwise :func:`_robust_hausdorff_95` of ``fixed == label`` and
    ``warped == label`` (area-weighted surface elements, unit spacing), which
    is ``inf`` for a label that was present in the moving map but warped out
    of view. The case value is ``np.nanmean`` of the result (so ``inf`` when
    any label went out of view). Each label is cropped to its bounding box in
    either map first, which changes nothing but the time (surface_distance
    crops to the same box itself).

    Args:
        fixed_labels, warped_labels, moving_labels: ``[D, H, W]`` label maps.
        labels: the label values to score (LUMIR lists 0, background, too).

    Returns:
        ``[len(labels)]`` float64, voxels.
    """
    labels = [int(v) for v in labels]
    fixed, warped = _label_map(fixed_labels, "fixed_labels"), _label_map(warped_labels, "warped_labels")
    moving = warped if moving_labels is None else _label_map(moving_labels, "moving_labels")
    valid = _present(fixed, labels) & _present(moving, labels)
    found = [ndimage.find_objects(fixed), ndimage.find_objects(warped)]
    out = np.full(len(labels), np.nan)
    for i, label in enumerate(labels):
        if valid[i]:
            box = _label_box(label, found, fixed.shape)
            out[i] = _robust_hausdorff_95(fixed[box] == label, warped[box] == label)
    return out


def landmark_distances(
    fixed_landmarks: np.ndarray, warped_landmarks: np.ndarray, labels: list[int] | None = None
) -> np.ndarray:
    """Distance in voxels between the centroids of each landmark label, warped moving vs fixed.

    Args:
        fixed_landmarks, warped_landmarks: ``[D, H, W]`` landmark-label volumes
            (0 = no landmark; each landmark a small blob of one label value).
        labels: the landmark labels; default every non-zero value of the fixed
            volume, as the official evaluator does.

    Returns:
        ``[len(labels)]`` float64; NaN for a landmark missing from either volume
        (e.g. warped out of view).
    """
    if labels is None:
        labels = [v for v in np.unique(fixed_landmarks) if v != 0]

    def centroids(volume: np.ndarray) -> np.ndarray:
        points = np.nonzero(volume)
        values, points = volume[points], np.stack(points, axis=1).astype(np.float64)
        return np.array([points[values == v].mean(0) if np.any(values == v) else np.full(3, np.nan) for v in labels])

    return np.linalg.norm(centroids(warped_landmarks) - centroids(fixed_landmarks), axis=1).reshape(len(labels))


def tre(fixed_landmarks: np.ndarray, warped_landmarks: np.ndarray, labels: list[int] | None = None) -> float:
    """Target registration error: the mean of :func:`landmark_distances`, in voxels.

    A plain mean, as the official evaluator: NaN if any landmark went missing.
    """
    return float(np.mean(landmark_distances(fixed_landmarks, warped_landmarks, labels)))


def _det3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """det of the 3x3 matrices with rows a, b, c (each ``[3, ...]``), expanded as the official code does."""
    return a[0] * (b[1] * c[2] - b[2] * c[1]) - b[0] * (a[1] * c[2] - a[2] * c[1]) + c[0] * (a[1] * b[2] - a[2] * b[1])


def _is_torch(array) -> bool:
    return type(array).__module__.split(".")[0] == "torch"


def _index_grid(shape, like) -> np.ndarray:
    """``[3, *shape]`` float64 voxel indices, a numpy array or (for a torch ``like``) a tensor on its device."""
    if _is_torch(like):
        import torch  # only when torch tensors come in: the metrics need numpy alone

        axes = [torch.arange(n, dtype=torch.float64, device=like.device) for n in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return np.indices(shape, dtype=np.float64)


def _ones(shape, like) -> np.ndarray:
    """An all-True boolean array of ``shape``, numpy or (for a torch ``like``) a tensor on its device."""
    if _is_torch(like):
        import torch

        return torch.ones(shape, dtype=torch.bool, device=like.device)
    return np.ones(shape, bool)


def _transform(disp: np.ndarray, start: int = 0) -> np.ndarray:
    """``[3, d, H, W]`` float64 ``T = disp + x`` for the slab of rows from ``start`` on.

    The global row index goes into the grid before the one addition, so every
    value equals the official's ``disp + grid`` bit for bit.
    """
    grid = _index_grid(disp.shape[:3], disp)
    grid[0] += start
    channels_first = disp.permute(3, 0, 1, 2) if _is_torch(disp) else np.moveaxis(disp, -1, 0)
    return channels_first + grid


def _diff(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.diff(x, axis=axis)`` by slicing (the same subtraction), for numpy arrays and torch tensors alike."""
    head = [slice(None)] * x.ndim
    tail = [slice(None)] * x.ndim
    head[axis], tail[axis] = slice(1, None), slice(None, -1)
    return x[tuple(head)] - x[tuple(tail)]


def _jacobians(trans: np.ndarray):
    """The 10 determinants at the interior voxels of ``trans`` (see :func:`digital_jacobians`)."""
    shape = trans.shape[1:]
    steps = [_diff(trans, 1 + a) for a in range(3)]  # T(q + e_a) - T(q)

    def step(a: int, sign: int) -> np.ndarray:  # forward (+1) or backward (-1) difference at every interior p
        return steps[a][
            (slice(None),)
            + tuple(
                slice(1 if sign > 0 else 0, n - 1 if sign > 0 else n - 2) if b == a else slice(1, n - 1)
                for b, n in enumerate(shape)
            )
        ]

    for signs in _ONE_SIDED:
        yield _det3(*[step(a, s) for a, s in enumerate(signs)])

    def at(offset) -> np.ndarray:  # T(p + offset) for every interior p
        return trans[(slice(None),) + tuple(slice(1 + o, n - 1 + o) for o, n in zip(offset, shape))]

    centre = at((0, 0, 0))
    for tet in _CENTRAL:
        yield _det3(*[at(v) - centre for v in tet])


def digital_jacobians(disp: np.ndarray) -> list[np.ndarray]:
    """The 10 finite-difference Jacobian determinants of the 'digital diffeomorphism' criterion.

    For the transform ``T(x) = x + disp[x]`` (float64) at every interior voxel
    p (the one-voxel border dropped):

    - 8 one-sided: ``det[d0, d1, d2]`` with ``d_a = T(p + e_a) - T(p)``
      (forward) or ``T(p) - T(p - e_a)`` (backward), all 2^3 choices: 6 times
      the signed volume of a corner tetrahedron of a voxel cube; 1 for the
      identity.
    - 2 central: ``det[T(p+v) - T(p) for v in V]`` with V = {-e0-e1, -e0-e2,
      -e1-e2} and {e0+e1, e1+e2, e0+e2}: 6 times the signed volume of the
      tetrahedron inside the cube; 2 for the identity.

    Liu et al., "On finite difference Jacobian computation in deformable image
    registration", IJCV 2024; the official LUMIR ``digital_diffeomorphism.py``,
    whose values these equal bit for bit.

    Args:
        disp: ``[D, H, W, 3]`` displacement in voxels, D, H, W >= 3.

    Returns:
        10 arrays ``[D-2, H-2, W-2]`` float64: the 8 one-sided (signs of axes
        0, 1, 2: +++, ++-, +-+, +--, -++, -+-, --+, ---), then J*_1, J*_2.
    """
    return list(_jacobians(_transform(_check_disp(disp))))


def ndv_percent(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Non-diffeomorphic volume, % of the mask's interior voxels (LUMIR's NDV).

    Each of the 10 :func:`digital_jacobians` ``J`` that is negative adds
    ``-0.5 * J / 6`` voxel volumes at its voxel: ``|J| / 6`` is its
    tetrahedron's volume, and the 0.5 averages the two ways (4 corner + 1
    central tetrahedra each) of cutting a cube into tetrahedra; so a voxel
    whose 10 tetrahedra are all inverted (e.g. one axis mirrored) counts 1.
    The sum over the mask is divided by the number of mask voxels, times 100.
    Computed in slabs along axis 0, so the temporaries stay in cache.
    numpy arrays, or torch tensors (computed on their device, float64; the
    QC report of the service uses that).

    Args:
        disp: ``[D, H, W, 3]`` displacement in voxels, D, H, W >= 3.
        mask: ``[D, H, W]`` on the same grid (same array type), nonzero = counted (the official
            evaluator uses the *moving* image's nonzero voxels); its one-voxel
            border is dropped like the Jacobians'. Default: every voxel.

    Returns:
        NDV in percent (float); NaN for an empty mask.
    """
    depth = _check_disp(disp).shape[0]
    interior = [n - 2 for n in disp.shape[:3]]
    if mask is None:
        inside = _ones(interior, disp)
    else:
        mask = mask if _is_torch(mask) else np.asarray(mask)
        if tuple(mask.shape) != tuple(disp.shape[:3]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the field's grid {tuple(disp.shape[:3])}")
        inside = mask[1:-1, 1:-1, 1:-1] > 0
    volume = 0.0
    for start in range(0, depth - 2, _SLAB):  # interior rows start+1 ... start+_SLAB
        stop = min(start + _SLAB, depth - 2)
        folded = sum((-j).clip(min=0.0) for j in _jacobians(_transform(disp[start : stop + 2], start)))
        volume += float(folded[inside[start:stop]].sum())
    volume *= 0.5 / 6
    count = int(inside.sum())
    return float(volume / count * 100) if count else float("nan")


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """Jacobian determinant of ``T(x) = x + disp[x]`` by central differences.

    ``det(I + grad disp)`` with ``np.gradient`` (central differences inside,
    one-sided on the border), float64; torch tensors with ``torch.gradient``
    (the same differences) on their device.

    Args:
        disp: ``[D, H, W, 3]`` displacement in voxels.

    Returns:
        ``[D, H, W]`` float64; 1 for a translation, <= 0 where it folds.
    """
    disp = _check_disp(disp)
    if _is_torch(disp):
        import torch

        disp = disp.double()
        gradient = lambda x, a: torch.gradient(x, dim=a)[0]  # noqa: E731
    else:
        disp = disp.astype(np.float64)
        gradient = lambda x, a: np.gradient(x, axis=a)  # noqa: E731
    # row a: d(x + disp)/d x_a, the official's layout
    return _det3(*[[gradient(disp[..., c], a) + (c == a) for c in range(3)] for a in range(3)])


def sdlogj(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of ``log(clip(J, 1e-9, 1e9))``, J the central-difference Jacobian.

    Over the voxels at least 2 from the border (``[2:-2]`` on each axis, as
    the official evaluator crops), restricted to ``mask > 0`` there when a
    mask is given; population std (ddof 0). The official L2R/LUMIR code adds 3
    to J before the clip (an upstream quirk); this does not. LUMIR does not
    score SDlogJ.

    Args:
        disp: ``[D, H, W, 3]`` displacement in voxels, D, H, W >= 5.
        mask: optional ``[D, H, W]``, nonzero = counted.

    Returns:
        float, dimensionless; 0 for a translation.
    """
    log_j = np.log(np.clip(jacobian_determinant(disp)[2:-2, 2:-2, 2:-2], 1e-9, 1e9))
    if mask is not None:
        log_j = log_j[np.asarray(mask)[2:-2, 2:-2, 2:-2] > 0]
    return float(log_j.std())
