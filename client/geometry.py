"""Bringing any 3-D brain MRI onto the model's canvas, and the model's answer back onto the caller's grids.

Pure numpy, nibabel and scipy (no torch). Conventions, as in :mod:`lumireg.contract`:

- A volume is the NIfTI data array as stored, axes (i, j, k); an ``affine`` maps voxel indices to world (NIfTI
  RAS+) mm, as (4, 4). Voxel centres sit at integer indices.
- The canvas is :data:`CANVAS` = (160, 224, 192) voxels of 1 mm, RAS: axes i, j, k point to +x (right),
  +y (anterior), +z (superior). Each image gets its own canvas, centred on its centre of intensity mass (the
  head's, so an off-centre head is not cut off); the server aligns the two canvases (request parameter ``align``)
  and registers them voxel by voxel.
- A displacement is ``(3, X, Y, Z)`` in voxel units, channel c along array axis c, pull-back from the fixed
  grid: ``warped(x) = moving(x + d(x))``, trilinear, zero outside (``grid_sample(align_corners=True)``).

LUMIR's own files (uint8 on exactly the canvas shape) are "native": sent as they are, their grid is the canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from lumireg.contract import CANVAS, CANVAS_SPACING_MM, intensities_to_uint8

_CENTRE = (np.array(CANVAS, dtype=np.float64) - 1) / 2
_SLAB_VOXELS = 1 << 21  # fixed-grid voxels per slab: keeps the float64 temporaries at ~50 MB each


@dataclass(frozen=True, eq=False)
class Placement:
    """How one caller image sits on the canvas (immutable; compared by identity, as it holds arrays).

    Attributes:
        shape: the caller image's grid (X, Y, Z), voxels.
        affine: (4, 4) caller voxel -> RAS mm.
        canvas_affine: (4, 4) canvas voxel -> RAS mm (the image's own affine when ``native``).
        native: True for a LUMIR image sent as is: no resampling, no intensity change.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    canvas_affine: np.ndarray
    native: bool

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        for name in ("affine", "canvas_affine"):
            matrix = np.array(getattr(self, name), dtype=np.float64)
            matrix.flags.writeable = False
            object.__setattr__(self, name, matrix)


def is_native(data: np.ndarray) -> bool:
    """True iff ``data`` is a LUMIR image as stored: shape :data:`CANVAS` and dtype uint8 (sent as is)."""
    return tuple(data.shape) == CANVAS and data.dtype == np.uint8


def _check_affine(affine) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"the affine must be a finite 4x4 matrix, got {affine.tolist()}")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ValueError(f"the affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    linear = affine[:3, :3]
    if abs(np.linalg.det(linear)) <= 1e-6 * np.prod(np.linalg.norm(linear, axis=0)):
        raise ValueError(f"the affine is singular: {affine.tolist()}")
    return affine


def canvas_affine_for(shape, affine, centre_mm=None) -> np.ndarray:
    """The (4, 4) canvas voxel -> RAS mm matrix of an image: 1 mm, RAS axes, and the canvas centre voxel
    ``(CANVAS - 1) / 2`` on the world point ``centre_mm`` (3, RAS mm), by default the centre
    ``affine @ ((shape - 1) / 2)`` of the image's field of view."""
    affine = _check_affine(affine)
    if centre_mm is None:
        centre = affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2) + affine[:3, 3]
    else:
        centre = np.asarray(centre_mm, dtype=np.float64)
    out = np.eye(4) * CANVAS_SPACING_MM
    out[3, 3] = 1
    out[:3, 3] = centre - CANVAS_SPACING_MM * _CENTRE
    return out


def intensity_centre(image: np.ndarray, affine: np.ndarray, lo: float, hi: float) -> np.ndarray | None:
    """The world point (3, RAS mm) of the centre of intensity mass of ``image`` (X, Y, Z, finite), each voxel
    weighted by ``clip((x - lo) / (hi - lo), 0, 1)``, its canvas intensity, moved to the nearest point a whole
    number of voxels from the field of view's centre (so a 1 mm image's voxels still fall on canvas voxels: no
    blur from the placement); None when every weight is 0."""
    weights = np.clip((image - np.float32(lo)) / np.float32(hi - lo), 0, 1, dtype=np.float32)
    total = float(weights.sum(dtype=np.float64))
    if total <= 0:
        return None
    index = [
        float(weights.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64) @ np.arange(n)) / total
        for axis, n in enumerate(image.shape)
    ]
    middle = (np.asarray(image.shape, dtype=np.float64) - 1) / 2
    return affine[:3, :3] @ (middle + np.rint(np.array(index) - middle)) + affine[:3, 3]


def to_canvas(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Placement]:
    """Brings one image onto its canvas.

    Native images (:func:`is_native`) come back unchanged (the same object). Others get a canvas centred on their
    centre of intensity mass (:func:`intensity_centre`; the field of view's centre for an image without mass) and
    are resampled trilinearly at every canvas voxel c, from image voxel ``inv(affine) @ canvas_affine @ c`` (zero
    outside the image), then mapped to 0..255: ``lo, hi`` are the 0.5th and 99.5th percentiles of the original
    finite voxels and the canvas value is ``round(clip((x - lo) / (hi - lo), 0, 1) * 255)``. Outside the image's
    field of view the canvas is 0. Non-finite voxels count as 0. Along axes finer than 1 mm the image is first
    smoothed with a Gaussian of ``sigma = 0.4 / spacing`` voxels (0.4 mm), against aliasing.

    Args:
        data: (X, Y, Z) image, any real dtype.
        affine: (4, 4) image voxel -> RAS mm.

    Returns:
        The (160, 224, 192) uint8 canvas image and its :class:`Placement`.

    Raises:
        ValueError: data not 3-D, empty or constant (all zero included); affine not finite or singular.
    """
    data, affine = np.asarray(data), _check_affine(affine)
    if data.ndim != 3 or data.size == 0:
        raise ValueError(f"the image must be a non-empty 3-D array, got shape {data.shape}")
    if is_native(data):
        if data.min() == data.max():
            raise ValueError(f"the image is constant (every voxel is {data.flat[0]})")
        return data, Placement(data.shape, affine, affine, True)
    finite = np.isfinite(data)
    if not finite.any():
        raise ValueError("the image has no finite voxel")
    lo, hi = np.percentile(data[finite] if not finite.all() else data, [0.5, 99.5])
    if hi == lo:
        raise ValueError(f"the image is constant: its 0.5th and 99.5th percentiles are both {lo}")
    image = np.where(finite, data, 0).astype(np.float32, copy=False)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    fine = spacing < CANVAS_SPACING_MM * (1 - 1e-3)
    if fine.any():
        # capped at the image's own size: a (mis-scaled) micrometre affine would ask for a kernel larger than memory
        sigma = np.minimum(np.where(fine, 0.4 * CANVAS_SPACING_MM / spacing, 0), np.array(data.shape, dtype=float))
        image = ndimage.gaussian_filter(image, sigma, mode="nearest")
    canvas_affine = canvas_affine_for(data.shape, affine, intensity_centre(image, affine, lo, hi))
    pull = np.linalg.inv(affine) @ canvas_affine
    # cval=lo: outside the field of view maps to 0 whatever the image's intensity range
    canvas = ndimage.affine_transform(
        image,
        pull[:3, :3],
        pull[:3, 3],
        output_shape=CANVAS,
        output=np.float32,
        order=1,
        mode="grid-constant",
        cval=float(lo),
    )
    canvas = intensities_to_uint8((canvas - lo) / (hi - lo))
    return canvas, Placement(data.shape, affine, canvas_affine, False)


def _slabs(shape):  # (start, stop) ranges along axis 0
    step = max(1, _SLAB_VOXELS // max(1, shape[1] * shape[2]))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def _grid(shape, start, stop) -> np.ndarray:
    return np.mgrid[start:stop, 0 : shape[1], 0 : shape[2]].astype(np.float64)


def _apply(matrix, points) -> np.ndarray:
    """(4, 4) homogeneous ``matrix`` applied to (3, ...) ``points``; a near-identity is applied exactly."""
    if np.allclose(matrix, np.eye(4), rtol=0, atol=1e-9):
        return points
    offset = matrix[:3, 3].reshape(3, *(1,) * (points.ndim - 1))
    return np.einsum("ij,j...->i...", matrix[:3, :3], points) + offset


def field_to_fixed_grid(canvas_disp: np.ndarray, fixed: Placement, moving: Placement) -> np.ndarray:
    """The network's canvas displacement as a displacement on the caller's fixed grid, world-anchored.

    For fixed voxel x: ``c = inv(fixed.canvas_affine) @ fixed.affine @ x`` (fixed canvas voxel); ``u(c)`` is
    ``canvas_disp`` interpolated trilinearly at c (nearest edge value outside the canvas); the moving canvas voxel
    ``c + u(c)`` is the world point ``q = moving.canvas_affine @ (c + u(c))``; ``d(x) = inv(fixed.affine) @ q - x``.
    For a native pair with the same affine, ``d == canvas_disp``.

    Args:
        canvas_disp: (3, 160, 224, 192) float16/float32, canvas voxels, pull-back from the fixed canvas.
        fixed, moving: the :class:`Placement` of the fixed and of the moving image.

    Returns:
        (3, *fixed.shape) float32 displacement d in fixed-image voxel units, pull-back from the fixed grid:
        ``fixed.affine @ (x + d(x))`` is the world point (in the moving image's world) that x corresponds to.
    """
    if canvas_disp.shape != (3, *CANVAS):
        raise ValueError(f"canvas_disp must have shape {(3, *CANVAS)}, got {canvas_disp.shape}")
    u_all = np.asarray(canvas_disp, dtype=np.float32)
    to_canvas_voxel = np.linalg.inv(fixed.canvas_affine) @ fixed.affine
    back = np.linalg.inv(fixed.affine) @ moving.canvas_affine
    out = np.empty((3, *fixed.shape), dtype=np.float32)
    for start, stop in _slabs(fixed.shape):
        x = _grid(fixed.shape, start, stop)
        if fixed.native:  # the fixed grid is the canvas: no interpolation
            c, u = x, u_all[:, start:stop]
        else:
            c = _apply(to_canvas_voxel, x)
            u = np.stack([ndimage.map_coordinates(u_all[k], c, order=1, mode="nearest") for k in range(3)])
        out[:, start:stop] = _apply(back, c + u) - x
    return out


def moving_coordinates(
    disp: np.ndarray, fixed: Placement, moving: Placement, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """Moving-image voxel coordinates ``inv(moving.affine) @ fixed.affine @ (x + d(x))`` of the fixed voxels x
    with ``start <= x[0] < stop``, as (3, stop - start, Y, Z) float64; ``disp`` is d, (3, *fixed.shape), voxels."""
    stop = fixed.shape[0] if stop is None else stop
    x = _grid(fixed.shape, start, stop)
    return _apply(np.linalg.inv(moving.affine) @ fixed.affine, x + disp[:, start:stop])


def warp_to_fixed(
    moving_data: np.ndarray, disp: np.ndarray, fixed: Placement, moving: Placement, labels: bool = False
) -> np.ndarray:
    """The caller's own moving array resampled onto the fixed grid through d.

    The value at fixed voxel x is ``moving_data`` at moving voxel ``inv(moving.affine) @ fixed.affine @ (x + d(x))``;
    outside the moving image it is 0 (zero padding beyond the voxel centres, as ``grid_sample``).

    Args:
        moving_data: (*moving.shape) image (non-finite voxels count as 0) or, with ``labels``, integer labels.
        disp: (3, *fixed.shape) displacement d from :func:`field_to_fixed_grid`, fixed-image voxels.
        fixed, moving: the :class:`Placement` of the fixed and of the moving image.
        labels: nearest neighbour and the labels' dtype instead of trilinear float32.

    Returns:
        (*fixed.shape) float32 image, or labels of ``moving_data.dtype``.
    """
    if tuple(moving_data.shape) != moving.shape:
        raise ValueError(f"moving_data has shape {moving_data.shape}, its placement says {moving.shape}")
    if disp.shape != (3, *fixed.shape):
        raise ValueError(f"disp must have shape {(3, *fixed.shape)}, got {disp.shape}")
    if labels:
        if not np.issubdtype(moving_data.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {moving_data.dtype}")
        source, order = moving_data, 0
    else:
        source, order = np.where(np.isfinite(moving_data), moving_data, 0).astype(np.float32, copy=False), 1
    out = np.empty(fixed.shape, dtype=source.dtype)
    for start, stop in _slabs(fixed.shape):
        coords = moving_coordinates(disp, fixed, moving, start, stop)
        out[start:stop] = ndimage.map_coordinates(
            source, coords, order=order, mode="grid-constant", cval=0, output=source.dtype
        )
    return out


def itk_displacement(disp: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """d as ITK/ANTs store a displacement field in NIfTI: world millimetres, LPS.

    ``D_RAS(x) = fixed_affine[:3, :3] @ d(x)`` and ``D_LPS = diag(-1, -1, 1) @ D_RAS``. ITK maps the fixed physical
    point p to ``p + D(p)`` and samples the moving image there (pull-back), as d does.

    Args:
        disp: (3, X, Y, Z) displacement d, fixed-image voxels.
        fixed_affine: (4, 4) fixed voxel -> RAS mm.

    Returns:
        (X, Y, Z, 1, 3) float32, mm, LPS components.
    """
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise ValueError(f"disp must have shape (3, X, Y, Z), got {disp.shape}")
    to_lps = (np.diag([-1.0, -1.0, 1.0]) @ _check_affine(fixed_affine)[:3, :3]).astype(np.float32)
    return np.einsum("ij,j...->...i", to_lps, np.asarray(disp, dtype=np.float32))[..., None, :]


def itk_image(disp: np.ndarray, fixed_affine: np.ndarray, header=None) -> nib.Nifti1Image:
    """The displacement-field NIfTI that antsApplyTransforms / antspyx take as a transform.

    Data :func:`itk_displacement` (float32, (X, Y, Z, 1, 3), mm, LPS), the fixed affine as qform and sform
    (code 1, scanner), intent 'vector' (1007), units mm. ``header``: the fixed image's, to keep its other fields.
    """
    fixed_affine = _check_affine(fixed_affine)
    header = None if header is None else nib.Nifti1Header.from_header(header)
    image = nib.Nifti1Image(itk_displacement(disp, fixed_affine), fixed_affine, header)
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(1, 0)
    image.header.set_intent("vector", (), "")
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(fixed_affine, code=1)
    image.set_sform(fixed_affine, code=1)
    return image
