"""Benchmark pairs from a generator independent of training's: B-spline warps, a tissue-mixture contrast, other labels.

The training generator (``lumireg.train.synthetic``) warps the template by
the flow of a random stationary velocity (Gaussian-smoothed control noise,
spacing 16 mm), changes contrast by gamma, a trilinear bias grid and Gaussian
noise, and scores octant x tissue labels. A network can learn exactly that
family, so held-out pairs from it flatter the network. This module shares none
of it: numpy and scipy only (no torch, no ``lumireg.kernels``, nothing from
``lumireg.train`` but :mod:`lumireg.train.canvas`: its mask, tissues and files), and
nothing in ``train/`` imports it.

Pair ``index`` (any int >= 0) is a pure function of the index:
``numpy.random.default_rng(SeedSequence([SALT, index]))`` spawns one stream
for the fixed and one for the moving image. Each image is the template
canvas (LUMIR's 160 x 224 x 192 at 1 mm) warped by its own random transform,
so the fixed -> moving transform is known to no method.

**Deformation** (lengths in mm, canvas voxels are 1 mm): the composition
``T = T_1 o T_2 o T_3`` of three cubic B-spline free-form deformations
(:data:`LEVELS`): one global, control spacing U(40, 64) mm, control
displacements N(0, s) per component with s ~ U(4, 10) mm; two local, spacing
U(16, 24) mm each, s ~ U(1.25, 3) mm. Every level has its own random
control-grid phase, and each control displacement is softly bounded,
``b * tanh(c / b)`` with ``b = 0.38 * spacing``, inside Choi and Lee's
sufficient condition for an injective cubic B-spline in 3D (``|c| < spacing /
2.48 = 0.403 * spacing`` per component; Rueckert et al. 2006 use 0.4), so
each level is a diffeomorphism and so is their composition. The composition
is evaluated exactly (scipy's cubic B-spline evaluation of the control grid at
the displaced points) on a grid of about 4 mm and upsampled trilinearly to
the voxels. Resampling: ``scipy.ndimage.map_coordinates``, pull-back
``out(x) = template(x + u(x))``, voxel centres at integer coordinates, order 1
for images, order 0 for labels, zero outside.

**Intensities** (a contrast model training never draws): the template's GM
and WM probability maps (nilearn's ICBM152 2009a, as :mod:`lumireg.train.canvas`
crops them) and ``p_csf = 1 - p_gm - p_wm`` inside the brain mask mix three
tissue levels drawn per image in T1 order: WM ~ U(0.7, 1), GM = WM x
U(0.55, 0.8), CSF = GM x U(0.15, 0.5) (same contrast, so local NCC stays
meaningful); or, for cross-contrast pairs, T2-like: CSF ~ U(0.7, 1), GM = CSF x
U(0.45, 0.7), WM = GM x U(0.5, 0.8), with the background still 0, so no
monotonic map takes one contrast to the other. After warping: a random monotone piecewise-linear intensity map
(knots at 0, 1/4, 1/2, 3/4, 1, increments Dirichlet(8, 8, 8, 8)), a smooth
multiplicative bias ``exp(quadratic polynomial)`` of the normalised
coordinates (linear coefficients N(0, 0.08), quadratic and cross N(0, 0.05)),
Rician noise ``|I + sigma (n1 + i n2)|`` with sigma ~ U(0.005, 0.03) inside
the brain, then LUMIR's scaling: the 99.8th percentile of the brain -> 255,
clipped, rounded, / 255.

**Labels** (not training's octants; the cut planes are chosen to coincide
with none of training's): tissue (the canvas's CSF / GM / WM, as its labels
encode them) x a 3 x 3 x 2 parcellation of the brain mask: left / middle /
right thirds of the mask's bounding box along i (cuts at canvas i = 56, 105;
training cuts at the midline, 80), posterior / middle / anterior thirds along
j (cuts at j = 81, 143; training: 106), and inferior / superior of a plane
through the bounding box centre (j, k) = (111.5, 95.5) tilted 20 degrees
about the i axis, rising anteriorly (training: the axial plane k = 99).
``label = 1 + 18 * tissue + 9 * superior + 3 * ap + lr`` (ap, lr in 0, 1, 2),
54 labels named in :data:`LABELS`, e.g. 1 = ``"csf_left_posterior_inferior"``,
54 = ``"wm_right_anterior_superior"``; 0 is background. Smaller parcels than
octants, so Dice stays sensitive to local misalignment.

Calibration (pairs 0..9 at 1 mm): no registration scores Dice 0.457 over
these 54 labels (0.38 to 0.58 per pair); the largest displacement of an image
from the template is 6.7 to 11.7 mm; every field has NDV 0 and a smallest
Jacobian determinant of 0.53 or more. A pair takes 3 to 4 s of one CPU core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

from lumireg.contract import CANVAS
from lumireg.train.canvas import CROP_START, TISSUES, lumir_canvas, template_path

SALT = 0x1D3B_5A17  # this module's own random stream; no other generator uses it
INJECTIVITY = 0.38  # control displacement bound / spacing, below Choi and Lee's 1 / 2.48 = 0.403
COMPOSE_MM = 4.0  # sampling of the composed field before the trilinear upsampling
TILT_DEGREES = 20.0
LR = ("left", "middle", "right")
AP = ("posterior", "middle", "anterior")
SI = ("inferior", "superior")
LABELS = {
    1 + 18 * t + 9 * s + 3 * a + r: f"{tissue}_{LR[r]}_{AP[a]}_{SI[s]}"
    for t, tissue in enumerate(TISSUES)
    for s in range(2)
    for a in range(3)
    for r in range(3)
}


@dataclass(frozen=True)
class Level:
    """One B-spline level: ``spacing_mm`` and per-component control ``std_mm`` drawn uniformly per image."""

    spacing_mm: tuple[float, float]
    std_mm: tuple[float, float]


LEVELS = (Level((40.0, 64.0), (4.0, 10.0)), Level((16.0, 24.0), (1.25, 3.0)), Level((16.0, 24.0), (1.25, 3.0)))


@dataclass(frozen=True)
class IndependentConfig:
    """How an independent pair is drawn (see the module docstring). Lengths in mm, intensities in 0..1.

    Attributes:
        levels: the B-spline levels, composed first-outermost (``T_1 o T_2 o ...``).
        injectivity: control displacements are bounded by ``injectivity * spacing``
            per component; ``None`` drops the bound (tests use it to show folding is caught).
        wm, gm_over_wm, csf_over_gm: (low, high) of the tissue levels (T1-like: WM > GM > CSF).
        t2_csf, t2_gm_over_csf, t2_wm_over_gm: the same for the T2-like contrast (CSF > GM > WM).
        dirichlet: concentration of the intensity map's 4 increments (larger: closer to identity).
        bias_linear_std, bias_quadratic_std: std of the bias polynomial's coefficients.
        noise_std: (low, high) of the Rician sigma.
        upper_percentile: the brain percentile that maps to 255.
    """

    levels: tuple[Level, ...] = LEVELS
    injectivity: float | None = INJECTIVITY
    wm: tuple[float, float] = (0.7, 1.0)
    gm_over_wm: tuple[float, float] = (0.55, 0.8)
    csf_over_gm: tuple[float, float] = (0.15, 0.5)
    t2_csf: tuple[float, float] = (0.7, 1.0)
    t2_gm_over_csf: tuple[float, float] = (0.45, 0.7)
    t2_wm_over_gm: tuple[float, float] = (0.5, 0.8)
    dirichlet: float = 8.0
    bias_linear_std: float = 0.08
    bias_quadratic_std: float = 0.05
    noise_std: tuple[float, float] = (0.005, 0.03)
    upper_percentile: float = 99.8


def _crop(volume: np.ndarray) -> np.ndarray:
    """Template grid -> canvas, ``out[x] = volume[x + CROP_START]``, zero where the template has no voxel."""
    out = np.zeros(CANVAS, volume.dtype)
    src = tuple(slice(max(s, 0), min(s + n, size)) for s, n, size in zip(CROP_START, CANVAS, volume.shape))
    out[tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, CROP_START))] = volume[src]
    return out


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Canvas-grid sources: ``(3, 160, 224, 192)`` float32 CSF / GM / WM probabilities (zero outside
    the mask), the ``(160, 224, 192)`` uint8 label map, and the mask's bounding box ``(low, high)``
    (voxel indices, high exclusive)."""
    canvas = lumir_canvas()
    probabilities = np.empty((3, *CANVAS), np.float32)
    for channel, name in ((1, "gm"), (2, "wm")):
        probabilities[channel] = _crop(np.asarray(nib.load(str(template_path(name))).dataobj, np.float32))
    probabilities[1:] *= np.float32(1 / 255)
    np.clip(1 - probabilities[1] - probabilities[2], 0, 1, out=probabilities[0])
    probabilities *= canvas.mask
    low, high = [], []
    for a in range(3):
        hit = canvas.mask.any(axis=tuple(b for b in range(3) if b != a))
        low.append(int(np.argmax(hit)))
        high.append(len(hit) - int(np.argmax(hit[::-1])))
    low, high = np.array(low), np.array(high)
    # uint8 throughout (labels <= 54); the canvas's labels are 1 + 8 * tissue + octant
    tissue = (np.maximum(canvas.labels, 1) - 1) // 8
    lr, ap = (
        np.searchsorted(
            np.round(low[a] + (high[a] - low[a]) * np.array([1, 2]) / 3), np.arange(CANVAS[a]), side="right"
        ).astype(np.uint8)
        for a in (0, 1)
    )
    j0, k0 = (low[1] + high[1] - 1) / 2, (low[2] + high[2] - 1) / 2
    jj, kk = np.ogrid[0 : CANVAS[1], 0 : CANVAS[2]]
    tilt = math.radians(TILT_DEGREES)
    superior = ((kk - k0) * math.cos(tilt) - (jj - j0) * math.sin(tilt) >= 0).astype(np.uint8)
    parcel = 1 + 9 * superior[None] + (3 * ap)[None, :, None] + lr[:, None, None]
    labels = np.where(canvas.mask, 18 * tissue + parcel, 0).astype(np.uint8)
    return probabilities, labels, (low, high)


def _hat_matrix(n: int, m: int) -> np.ndarray:
    """``(n, m)`` linear interpolation from ``m`` nodes to ``n`` points, both spanning [0, 1] end to end."""
    if m == 1:
        return np.ones((n, 1), np.float32)
    t = np.linspace(0, m - 1, n)[:, None] - np.arange(m)[None]
    return np.clip(1 - np.abs(t), 0, None).astype(np.float32)


def _separable(volume: np.ndarray, matrices: Sequence[np.ndarray]) -> np.ndarray:
    """``out[..., i, j, k] = sum_abc A[i, a] B[j, b] C[k, c] volume[..., a, b, c]`` by three matrix products."""
    for axis, matrix in enumerate(matrices):
        axis += volume.ndim - 3
        volume = np.moveaxis(np.tensordot(volume, matrix, axes=([axis], [1])), -1, axis)
    return volume


def random_field(
    shape: Sequence[int],
    rng: np.random.Generator,
    config: IndependentConfig | None = None,
    voxel_mm: Sequence[float] | None = None,
) -> np.ndarray:
    """A random diffeomorphism: the composition of :attr:`IndependentConfig.levels` B-spline FFDs.

    Args:
        shape: ``(D, H, W)`` of the output grid.
        rng: the only source of randomness.
        config: the levels and the injectivity bound (default :class:`IndependentConfig`).
        voxel_mm: voxel size along (D, H, W) in mm; default ``CANVAS / shape``
            (the canvas's field of view).

    Returns:
        ``(3, D, H, W)`` float32 pull-back displacement in voxels, channel c
        along axis c: ``warped(x) = image(x + u(x))``.
    """
    config = config or IndependentConfig()
    shape = tuple(int(n) for n in shape)
    voxel_mm = np.asarray(voxel_mm if voxel_mm is not None else [c / n for c, n in zip(CANVAS, shape)], float)
    extent = (np.array(shape) - 1) * voxel_mm
    coarse = [min(n, math.ceil(e / COMPOSE_MM) + 1) for n, e in zip(shape, extent)]
    axes = [np.linspace(0, e, c) for e, c in zip(extent, coarse)]
    points = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float64)  # (3, *coarse) mm
    moved = points.copy()
    levels = []
    for level in config.levels:
        spacing = rng.uniform(*level.spacing_mm)
        phase = rng.uniform(0, spacing, 3)
        count = [math.ceil((e + p) / spacing) + 7 for e, p in zip(extent, phase)]  # 3 knots margin each side
        control = rng.standard_normal((3, *count)) * rng.uniform(*level.std_mm)
        if config.injectivity is not None:
            bound = config.injectivity * spacing
            control = bound * np.tanh(control / bound)
        levels.append((spacing, phase, control))
    for spacing, phase, control in reversed(levels):  # innermost first: y <- T_l(y)
        # knot 0 sits at -phase - 3 spacings; map_coordinates(order=3, prefilter=False) sums control * beta3
        index = (moved + (phase + 3 * spacing)[:, None, None, None]) / spacing
        moved += np.stack(
            [ndimage.map_coordinates(c, index, order=3, prefilter=False, mode="nearest") for c in control]
        )
    disp = ((moved - points) / voxel_mm[:, None, None, None]).astype(np.float32)
    return _separable(disp, [_hat_matrix(n, c) for n, c in zip(shape, coarse)])


def _intensity_map(image: np.ndarray, rng: np.random.Generator, config: IndependentConfig) -> np.ndarray:
    knots = np.concatenate([[0.0], np.cumsum(rng.dirichlet([config.dirichlet] * 4))])
    return np.interp(image, np.linspace(0, 1, 5), knots).astype(np.float32)


def _bias(shape: Sequence[int], rng: np.random.Generator, config: IndependentConfig) -> np.ndarray:
    """``exp`` of a random quadratic polynomial of the coordinates scaled to [-1, 1]; float32 ``shape``."""
    x = [
        np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == b else 1 for b in range(3)])
        for a, n in enumerate(shape)
    ]
    linear = rng.normal(0, config.bias_linear_std, 3)
    quadratic = rng.normal(0, config.bias_quadratic_std, 6)
    separable = [linear[a] * x[a] + quadratic[a] * x[a] ** 2 for a in range(3)]
    log_bias = separable[0] + separable[1] + separable[2]
    log_bias = log_bias + quadratic[3] * x[0] * x[1] + quadratic[4] * x[0] * x[2] + quadratic[5] * x[1] * x[2]
    return np.exp(log_bias).astype(np.float32)


CONTRASTS = ("t1", "t2")


def _tissue_levels(rng: np.random.Generator, config: IndependentConfig, contrast: str) -> np.ndarray:
    """CSF, GM, WM intensities of one image: T1-like (WM brightest) or T2-like (CSF brightest, WM darkest)."""
    if contrast == "t1":
        wm = rng.uniform(*config.wm)
        gm = wm * rng.uniform(*config.gm_over_wm)
        return np.array([gm * rng.uniform(*config.csf_over_gm), gm, wm], np.float32)
    csf = rng.uniform(*config.t2_csf)
    gm = csf * rng.uniform(*config.t2_gm_over_csf)
    return np.array([csf, gm, gm * rng.uniform(*config.t2_wm_over_gm)], np.float32)


def _image(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    config: IndependentConfig,
    labels: bool,
    fields: bool,
    contrast: str = "t1",
) -> dict:
    """One image: the template warped by :func:`random_field`, then the intensity model (module docstring)."""
    probabilities, label_map, (low, high) = _template()
    disp = random_field(shape, rng, config)
    # canvas voxel of output voxel q (same field of view): (q + u + 0.5) * canvas / shape - 0.5
    scale = [c / n for c, n in zip(CANVAS, shape)]
    coords = disp.copy()
    inside = np.ones(shape, bool)
    for a, n in enumerate(shape):
        coords[a] += np.arange(n, dtype=np.float32).reshape([-1 if a == b else 1 for b in range(3)])
        if scale[a] != 1:
            coords[a] = (coords[a] + 0.5) * scale[a] - 0.5
        inside &= (coords[a] > low[a] - 1) & (coords[a] < high[a])
    # only voxels that sample the brain's bounding box can be nonzero: resample just their box
    box = tuple(
        slice(np.argmax(hit), len(hit) - np.argmax(hit[::-1])) if hit.any() else slice(0, 0)
        for hit in (inside.any(axis=tuple(b for b in range(3) if b != a)) for a in range(3))
    )
    coords = coords[(slice(None), *box)]
    source = np.tensordot(_tissue_levels(rng, config, contrast), probabilities, axes=1)
    image = np.zeros(shape, np.float32)
    image[box] = ndimage.map_coordinates(source, coords, order=1, output=np.float32)
    brain = image > 0
    values = _intensity_map(np.clip(image[brain], 0, 1), rng, config) * _bias(shape, rng, config)[brain]
    sigma = rng.uniform(*config.noise_std)
    noise = rng.standard_normal((2, values.size), dtype=np.float32) * np.float32(sigma)
    values = np.hypot(values + noise[0], noise[1])  # Rician: the magnitude of a complex signal
    top = float(np.percentile(values, config.upper_percentile)) if values.size else 1.0
    image[brain] = np.rint(np.clip(values * (255 / top), 0, 255)) / 255
    out = {"image": image[None]}
    if labels:
        out["labels"] = np.zeros((1, *shape), np.int32)
        out["labels"][(0, *box)] = ndimage.map_coordinates(label_map, coords, order=0)
    if fields:
        out["disp"] = disp
    return out


def independent_pair(
    index: int,
    shape: Sequence[int] | None = None,
    config: IndependentConfig | None = None,
    labels: bool = True,
    fields: bool = False,
    contrasts: tuple[str, str] = ("t1", "t1"),
) -> dict:
    """Generate independent pair ``index``; the same index always gives the same pair.

    Args:
        index: any int >= 0.
        shape: ``(D, H, W)`` of the output; ``None`` is LUMIR's 160 x 224 x 192
            at 1 mm; another shape samples the canvas at voxel size
            ``CANVAS / shape`` mm (same field of view, no anti-aliasing).
        config: the deformation and intensity model (default :class:`IndependentConfig`).
        labels: also warp the label maps (nearest).
        fields: also return each image's true displacement from the template.
        contrasts: the fixed and the moving image's contrast, ``"t1"`` or ``"t2"`` (:data:`CONTRASTS`);
            the contrast changes only the three tissue levels, so the deformations, bias and noise
            of pair ``index`` are the same in every contrast.

    Returns:
        numpy arrays in the sample format of ``lumireg.train.synthetic.synthetic_pair``:
        ``{"fixed", "moving"}`` ``(1, D, H, W)`` float32 in 0..1, multiples of
        1/255; ``{"fixed_labels", "moving_labels"}`` ``(1, D, H, W)`` int32,
        values in :data:`LABELS` (0 background), if ``labels``; ``"seed"``: the
        int ``index``; if ``fields``, ``{"fixed_disp", "moving_disp"}``:
        ``(3, D, H, W)`` float32 voxel pull-back displacements, ``fixed(x) ~
        template(x + fixed_disp(x))`` (before the intensity model).
    """
    index = int(index)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    shape = tuple(int(n) for n in (shape or CANVAS))
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes >= 2, got {shape}")
    if len(contrasts) != 2 or not set(contrasts) <= set(CONTRASTS):
        raise ValueError(f"contrasts must be two of {CONTRASTS}, got {contrasts!r}")
    config = config or IndependentConfig()
    sample = {}
    seeds = np.random.SeedSequence([SALT, index]).spawn(2)
    for name, seed, contrast in zip(("fixed", "moving"), seeds, contrasts):
        image = _image(np.random.default_rng(seed), shape, config, labels, fields, contrast)
        sample[name] = image["image"]
        if labels:
            sample[f"{name}_labels"] = image["labels"]
        if fields:
            sample[f"{name}_disp"] = image["disp"]
    sample["seed"] = index
    return sample
