"""A LUMIR-like brain built from the MNI ICBM152 2009a (symmetric) template shipped inside nilearn.

Sources (never downloaded: they are files of the installed ``nilearn`` wheel,
``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``):
``(197, 233, 189)`` uint8 at 1 mm, RAS+ (i to the right, j anterior, k
superior), affine ``diag(1, 1, 1)`` with origin ``(-98, -134, -72)`` mm; the
GM and WM maps are probabilities x 255.

Recipe:

- **Brain mask**: ``p_gm + p_wm > 0.5``, closed with a ball of radius 3, holes
  filled (ventricles), dilated by a ball of radius 2 to keep the sulcal and
  outer CSF. nilearn's T1 is already brain-extracted and this mask follows its
  edge to within a voxel.
- **Canvas**: LUMIR's 160 x 224 x 192 at 1 mm, same RAS+ orientation (no
  reorientation). Canvas voxel ``x`` is template voxel ``x + CROP_START``,
  ``CROP_START = (18, 6, -17)``: keeps template i 18..177, j 6..229 and
  k 0..174 and pads 17 zero slices below (k), so the mask's bounding box is
  centred to within half a voxel; every dropped slice is background. The canvas affine
  is the template's shifted by ``CROP_START``: origin ``(-80, -128, -89)`` mm,
  so files written with it overlay the template in any viewer.
- **Intensities**: T1 x 255 / (99.9th percentile inside the mask), clipped to
  0..255, rounded to uint8 like LUMIR's images; zero outside the mask.
- **Labels** (uint8, 0 = background): tissue ``t`` (0 CSF-ish = mask where
  ``p_gm + p_wm < 0.5``; 1 GM; 2 WM, whichever is more probable) times octant
  ``o`` around the mask's centroid: ``label = 1 + 8 * t + o`` with
  ``o = 4 * superior + 2 * anterior + right``; the splitting planes are the
  mid-sagittal plane (right: canvas i >= 80, x >= 0 mm) and the mask's rounded
  centroid (anterior: j >= 106; superior: k >= 99; :attr:`Canvas.centre`).
  24 labels, named in :data:`LABELS`, e.g. 9 =
  ``"gm_left_posterior_inferior"``, 24 = ``"wm_right_anterior_superior"``.
  Octants make Dice sensitive to local misalignment, not only global overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from itertools import product

import nibabel as nib
import numpy as np
from scipy import ndimage

from lumireg.contract import CANVAS

CROP_START = (18, 6, -17)
TISSUES = ("csf", "gm", "wm")
OCTANTS = tuple(
    f"{lr}_{ap}_{si}" for si, ap, lr in product(("inferior", "superior"), ("posterior", "anterior"), ("left", "right"))
)
LABELS = {1 + 8 * t + o: f"{tissue}_{octant}" for t, tissue in enumerate(TISSUES) for o, octant in enumerate(OCTANTS)}
MASK_THRESHOLD = 0.5
CLOSING_RADIUS = 3
DILATION_RADIUS = 2
UPPER_PERCENTILE = 99.9


@dataclass(frozen=True)
class Canvas:
    """The template on LUMIR's canvas; arrays are read-only ``(160, 224, 192)`` volumes.

    Attributes:
        image: uint8 T1 intensities 0..255, zero outside ``mask``.
        labels: uint8 label map, 0 outside ``mask``, values as in :data:`LABELS`.
        mask: bool brain mask.
        affine: ``(4, 4)`` float64 voxel -> RAS+ mm, 1 mm isotropic.
        centre: ``(3,)`` int, the octant split point in canvas voxels (i, j, k).
    """

    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    centre: tuple[int, int, int]


def template_path(name: str):
    """Path of nilearn's bundled ICBM152 2009 ``name`` volume (``"t1"``, ``"gm"`` or ``"wm"``)."""
    return files("nilearn") / "datasets" / "data" / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"


def _ball(radius: int) -> np.ndarray:
    grid = np.mgrid[(slice(-radius, radius + 1),) * 3]
    return (grid**2).sum(0) <= radius**2


def _to_canvas(volume: np.ndarray) -> np.ndarray:
    """Crop / zero-pad a template-grid volume onto the canvas: ``out[x] = volume[x + CROP_START]``."""
    out = np.zeros(CANVAS, volume.dtype)
    src = tuple(slice(max(s, 0), min(s + n, size)) for s, n, size in zip(CROP_START, CANVAS, volume.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, CROP_START))
    out[dst] = volume[src]
    return out


def brain_mask(p_gm: np.ndarray, p_wm: np.ndarray) -> np.ndarray:
    """Skull-strip mask from tissue probabilities in 0..1 (any grid): threshold, close, fill, dilate."""
    mask = ndimage.binary_closing(p_gm + p_wm > MASK_THRESHOLD, _ball(CLOSING_RADIUS))
    mask = ndimage.binary_fill_holes(mask)
    return ndimage.binary_dilation(mask, _ball(DILATION_RADIUS))


@lru_cache(maxsize=1)
def lumir_canvas() -> Canvas:
    """The template brain on LUMIR's 160 x 224 x 192 canvas (built once per process, then cached).

    Returns:
        A :class:`Canvas`; see the module docstring for the recipe and the label table.
    """
    t1_img = nib.load(str(template_path("t1")))
    t1, gm, wm = (np.asarray(nib.load(str(template_path(n))).dataobj, dtype=np.float32) for n in ("t1", "gm", "wm"))
    gm, wm = gm / 255, wm / 255
    mask = _to_canvas(brain_mask(gm, wm))
    t1, gm, wm = _to_canvas(t1), _to_canvas(gm), _to_canvas(wm)
    image = np.clip(np.rint(t1 * (255 / np.percentile(t1[mask], UPPER_PERCENTILE))), 0, 255)
    image = np.where(mask, image, 0).astype(np.uint8)

    tissue = np.where(gm + wm < MASK_THRESHOLD, 0, np.where(gm >= wm, 1, 2))
    # the template is symmetric: x = 0 mm is the mid-sagittal plane
    affine = t1_img.affine @ np.block([[np.eye(3), np.array(CROP_START)[:, None]], [np.zeros((1, 3)), 1.0]])
    midline = int(round(-affine[0, 3]))
    centre = (midline, *(int(round(c)) for c in np.argwhere(mask).mean(0)[1:]))
    ii, jj, kk = np.ogrid[tuple(slice(0, n) for n in CANVAS)]
    octant = 4 * (kk >= centre[2]) + 2 * (jj >= centre[1]) + (ii >= centre[0])
    labels = np.where(mask, 1 + 8 * tissue + octant, 0).astype(np.uint8)

    for array in (image, labels, mask, affine):
        array.flags.writeable = False
    return Canvas(image=image, labels=labels, mask=mask, affine=affine, centre=centre)
