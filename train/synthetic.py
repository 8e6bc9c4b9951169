"""Synthetic training pairs: the template canvas warped by two random diffeomorphisms.

Pair ``seed`` is a pure function of its seed: ``fixed = T o phi_f`` and
``moving = T o phi_m`` for two independent random stationary-velocity
transforms of the canvas ``T`` (:func:`lumireg.train.canvas.lumir_canvas`),
each image then given its own gamma, bias field and noise, and optionally a
new contrast (inverted, or a random intensity per label). Seeds from
:data:`EVAL_SEED_START` on are reserved for evaluation; training never sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lumireg.contract import CANVAS, INTEGRATION_STEPS
from lumireg.kernels import integrate, warp
from lumireg.train.canvas import LABELS, TISSUES, lumir_canvas

# far above the seeds the training loop draws (10**9 per --seed, from seed * 10**9)
EVAL_SEED_START = 10**12
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class SyntheticConfig:
    """How a synthetic pair is drawn. Lengths in mm (canvas voxels are 1 mm); intensities in 0..1.

    Attributes:
        spacing_mm: control-point spacing of the random velocity (its noise is
            smoothed with a Gaussian of sigma ``spacing_mm / 2``).
        velocity_rms_mm: (low, high): each velocity field is scaled to an RMS drawn uniformly here.
        coarse_spacing_mm: control-point spacing of a second, coarser velocity
            component added to the first (large smooth deformations, as between subjects).
        coarse_rms_mm: (low, high): RMS of that component, drawn uniformly; ``(0, 0)``
            (the default) draws no coarse component at all, so the stream of pairs is unchanged.
        integration_factor: velocities are integrated on a grid this many times coarser.
        steps: scaling-and-squaring steps (LUMIR's 7, :data:`lumireg.contract.INTEGRATION_STEPS`).
        gamma_log_std: per image ``x ** exp(N(0, s))``.
        bias_log_std: per image smooth multiplicative field ``exp(N(0, s))``,
            Gaussian noise on a ``bias_spacing_mm`` grid upsampled trilinearly.
        bias_spacing_mm: control-point spacing of the bias field.
        noise_std: (low, high): per image Gaussian noise std inside the brain, drawn uniformly.
        inversion_prob: probability of the inverted contrast (``1 - T1`` in the brain, T2-like).
        synthetic_prob: probability of a SynthMorph-style contrast: one intensity
            U(0.05, 1) per tissue, plus N(0, ``region_jitter``) per label, blurred.
        blur_mm: (low, high): Gaussian sigma of the synthetic contrast's blur (partial volume).
        region_jitter: spread of the label intensities around their tissue's.
        shared_contrast: both images of a pair get the same contrast (kind and
            label intensities), so local NCC still compares like with like;
            ``False`` draws it per image (cross-contrast pairs, for MI or label losses).
    """

    spacing_mm: float = 16.0
    velocity_rms_mm: tuple[float, float] = (1.5, 3.0)
    coarse_spacing_mm: float = 48.0
    coarse_rms_mm: tuple[float, float] = (0.0, 0.0)
    integration_factor: int = 4
    steps: int = INTEGRATION_STEPS
    gamma_log_std: float = 0.25
    bias_log_std: float = 0.15
    bias_spacing_mm: float = 48.0
    noise_std: tuple[float, float] = (0.0, 0.03)
    inversion_prob: float = 0.1
    synthetic_prob: float = 0.1
    blur_mm: tuple[float, float] = (0.5, 1.2)
    region_jitter: float = 0.03
    shared_contrast: bool = True

    def __post_init__(self):
        for name in ("velocity_rms_mm", "coarse_rms_mm", "noise_std", "blur_mm"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(low, high)}")
        if min(self.inversion_prob, self.synthetic_prob) < 0 or self.inversion_prob + self.synthetic_prob > 1:
            raise ValueError("inversion_prob and synthetic_prob must be >= 0 and sum to at most 1")
        if (
            min(self.spacing_mm, self.coarse_spacing_mm, self.bias_spacing_mm) <= 0
            or self.integration_factor < 1
            or self.steps < 0
        ):
            raise ValueError("spacings must be > 0, integration_factor >= 1 and steps >= 0")


# named distributions of training pairs (``lumireg train --synthetic NAME``)
PRESETS = {
    # the first bundled weights' distribution: one velocity scale (16 mm), 1.5-3 mm RMS per image
    "lumir": SyntheticConfig(),
    # broader: a coarse 48 mm component up to 5 mm RMS on top of the 16 mm one, more contrasts
    "broad": SyntheticConfig(
        velocity_rms_mm=(1.0, 3.5),
        coarse_rms_mm=(1.0, 5.0),
        gamma_log_std=0.3,
        bias_log_std=0.2,
        inversion_prob=0.1,
        synthetic_prob=0.25,
    ),
}


def training_seeds(n: int, start: int = 0) -> range:
    """``n`` consecutive training seeds from ``start``; ``ValueError`` if they reach the reserved range."""
    if n < 0 or start < 0 or start + n > EVAL_SEED_START:
        raise ValueError(f"training seeds must lie in [0, {EVAL_SEED_START}), got range({start}, {start + n})")
    return range(start, start + n)


def evaluation_seeds(n: int) -> range:
    """The first ``n`` reserved evaluation seeds: ``range(EVAL_SEED_START, EVAL_SEED_START + n)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return range(EVAL_SEED_START, EVAL_SEED_START + n)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _upsample(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resize with voxel centres at the corners (the kernels' ``align_corners=True``)."""
    return F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=True)


def gaussian_blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, D, H, W)`` with per-axis ``sigma`` in voxels, edges replicated."""
    channels = x.shape[1]
    for axis, s in enumerate(sigma):
        radius = math.ceil(2.5 * s)
        if radius == 0:
            continue
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / s) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        kernel = (taps / taps.sum()).view(shape).expand(channels, *shape[1:])
        pad = [0, 0] * (2 - axis) + [radius, radius] + [0, 0] * axis
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel, groups=channels)
    return x


def random_displacement(
    shape: Sequence[int],
    generator: torch.Generator,
    spacing_mm: float = 16.0,
    rms_mm: float = 3.0,
    voxel_mm: Sequence[float] = (1.0, 1.0, 1.0),
    factor: int = 4,
    steps: int = INTEGRATION_STEPS,
    coarse: tuple[float, float] | None = None,
) -> torch.Tensor:
    """A random smooth diffeomorphic displacement: the flow of a random stationary velocity.

    Gaussian noise on control points every ``spacing_mm`` is upsampled to a grid
    ``factor`` times coarser than ``shape``, smoothed (sigma ``spacing_mm / 2``),
    scaled to RMS ``rms_mm``, integrated there with :func:`lumireg.kernels.integrate`
    and upsampled trilinearly to ``shape``.

    Args:
        shape: ``(D, H, W)`` of the output grid.
        generator: the only source of randomness.
        spacing_mm, rms_mm: control-point spacing and velocity RMS, in mm.
        voxel_mm: voxel size of ``shape`` along (D, H, W), in mm.
        factor: coarsening of the integration grid.
        steps: scaling-and-squaring steps.
        coarse: optional ``(spacing_mm, rms_mm)`` of a second velocity component,
            drawn the same way and added to the first before integration.

    Returns:
        ``(1, 3, D, H, W)`` float32 pull-back displacement in voxels of ``shape``,
        channel c along axis c (``warp(image, disp)`` deforms ``image``).
    """
    extent = [(n - 1) * v for n, v in zip(shape, voxel_mm)]
    coarse_grid = [max(2, math.ceil(n / factor)) for n in shape]
    coarse_mm = [e / (c - 1) for e, c in zip(extent, coarse_grid)]

    def component(spacing: float, rms: float) -> torch.Tensor:
        control = [max(2, round(e / spacing) + 1) for e in extent]
        velocity = torch.randn(1, 3, *control, generator=generator)
        velocity = gaussian_blur(_upsample(velocity, coarse_grid), [spacing / 2 / v for v in coarse_mm])
        return velocity * (rms / velocity.square().mean().sqrt().clamp_min(1e-12))

    velocity = component(spacing_mm, rms_mm)
    if coarse is not None:
        velocity += component(*coarse)
    velocity /= torch.tensor(coarse_mm).view(1, 3, 1, 1, 1)  # mm -> coarse voxels, per channel
    disp = _upsample(integrate(velocity, steps), shape)
    return disp * torch.tensor([(n - 1) / (c - 1) for n, c in zip(shape, coarse_grid)]).view(1, 3, 1, 1, 1)


@lru_cache(maxsize=4)
def _source(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The canvas as ``(1, 1, *shape)`` float32 tensors: image in 0..1 and labels (exact small integers)."""
    canvas = lumir_canvas()
    image = torch.from_numpy(canvas.image.astype("float32") / 255)[None, None]
    labels = torch.from_numpy(canvas.labels.astype("float32"))[None, None]
    if shape != CANVAS:
        # same field of view, coarser voxels: resample voxel centres, not corners
        image = F.interpolate(image, size=shape, mode="trilinear", align_corners=False)
        labels = F.interpolate(labels, size=shape, mode="nearest-exact")
    return image, labels


def _contrast(image, labels, voxel_mm, generator, config: SyntheticConfig) -> torch.Tensor:
    """The source image in a random contrast: T1 as is, inverted, or one intensity per label."""
    draw = float(torch.rand((), generator=generator))
    if draw < config.inversion_prob:
        return torch.where(labels > 0, 1 - image, 0)
    if draw < config.inversion_prob + config.synthetic_prob:
        tissue = torch.rand(len(TISSUES), generator=generator) * 0.95 + 0.05
        lut = torch.zeros(len(LABELS) + 1)
        lut[1:] = tissue.repeat_interleave(len(LABELS) // len(TISSUES))
        lut[1:] += config.region_jitter * torch.randn(len(LABELS), generator=generator)
        sigma = _uniform(generator, *config.blur_mm)
        return gaussian_blur(lut.clamp(0, 1)[labels.long()], [sigma / v for v in voxel_mm])
    return image


def _corrupt(x, voxel_mm, generator, config: SyntheticConfig) -> torch.Tensor:
    """Gamma, bias field and noise on one warped image (in place), then LUMIR's 0..255 scaling and quantisation."""
    brain = x > 0
    x.clamp_(0, 1).pow_(math.exp(config.gamma_log_std * float(torch.randn((), generator=generator))))
    extent = [(n - 1) * v for n, v in zip(x.shape[2:], voxel_mm)]
    control = [max(2, round(e / config.bias_spacing_mm) + 1) for e in extent]
    bias = torch.randn(1, 1, *control, generator=generator) * config.bias_log_std
    x.mul_(_upsample(bias, x.shape[2:]).exp_())
    noise = torch.randn(x.shape, generator=generator).mul_(_uniform(generator, *config.noise_std))
    x.add_(noise.mul_(brain)).clamp_(min=0)
    # every image is rescaled on its own, as LUMIR's were: a robust maximum maps to 255
    sample = x.flatten()[::13]
    sample = sample[sample > 0]
    top = float(torch.quantile(sample, 0.999)) if len(sample) else 1.0
    return x.mul_(255 / top).clamp_(0, 255).round_().div_(255)


def synthetic_pair(
    seed: int,
    shape: Sequence[int] | None = None,
    config: SyntheticConfig | None = None,
    labels: bool = True,
    fields: bool = False,
) -> dict:
    """Generate synthetic pair ``seed``; the same seed always gives the same pair.

    Args:
        seed: any int >= 0 (see :data:`EVAL_SEED_START` for the reserved ones).
        shape: ``(D, H, W)`` of the output; ``None`` is LUMIR's 160 x 224 x 192
            at 1 mm; another shape resamples the canvas (same field of view, voxel
            size ``CANVAS / shape`` mm) and scales the fields to match.
        config: augmentation and deformation settings (default :class:`SyntheticConfig`).
        labels: also warp the label maps (nearest); skip them to save ~30 % when training.
        fields: also return each image's true displacement from the canvas (benchmarks score TRE with it).

    Returns:
        ``{"fixed", "moving"}``: ``(1, D, H, W)`` float32 in 0..1, multiples of
        1/255 (LUMIR's uint8 intensities / 255); ``{"fixed_labels",
        "moving_labels"}``: ``(1, D, H, W)`` int32, values in
        :data:`lumireg.train.canvas.LABELS` (0 background), if ``labels``;
        ``"seed"``: the int seed; if ``fields``, ``{"fixed_disp", "moving_disp"}``: ``(3, D, H, W)``
        float32 voxel pull-back displacements, ``fixed(x) ~ canvas(x + fixed_disp(x))`` (before the corruption).
    """
    config = config or SyntheticConfig()
    shape = tuple(int(n) for n in (shape or CANVAS))
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes >= 2, got {shape}")
    voxel_mm = [c / n for c, n in zip(CANVAS, shape)]
    generator = torch.Generator().manual_seed(int(seed))
    image, label_map = _source(shape)
    sources = [_contrast(image, label_map, voxel_mm, generator, config)]
    sources.append(sources[0] if config.shared_contrast else _contrast(image, label_map, voxel_mm, generator, config))
    sample = {}
    for name, source in zip(("fixed", "moving"), sources):
        rms = _uniform(generator, *config.velocity_rms_mm)
        coarse = None
        if config.coarse_rms_mm[1] > 0:
            coarse = (config.coarse_spacing_mm, _uniform(generator, *config.coarse_rms_mm))
        disp = random_displacement(
            shape, generator, config.spacing_mm, rms, voxel_mm, config.integration_factor, config.steps, coarse
        )
        sample[name] = _corrupt(warp(source, disp), voxel_mm, generator, config)[0]
        if labels:
            # labels held as float32 take grid_sample's float32 path; integer maps would go through float64
            sample[f"{name}_labels"] = warp(label_map, disp, mode="nearest")[0].to(torch.int32)
        if fields:
            sample[f"{name}_disp"] = disp[0]
    sample["seed"] = int(seed)
    return sample


def _check_seeds(seeds: Sequence[int], split: str) -> None:
    """Refuse reserved seeds for training and training seeds for evaluation, without iterating a range."""
    if isinstance(seeds, range):
        bounds = sorted((seeds[0], seeds[-1])) if len(seeds) else []
    else:
        bounds = [min(seeds), max(seeds)] if len(seeds) else []
    if bounds and bounds[0] < 0:
        raise ValueError(f"seeds must be >= 0, got {bounds[0]}")
    if split == "train" and bounds and bounds[1] >= EVAL_SEED_START:
        raise ValueError(f"seed {bounds[1]} is reserved for evaluation (>= {EVAL_SEED_START}); use training_seeds()")
    if split == "eval" and bounds and bounds[0] < EVAL_SEED_START:
        raise ValueError(f"seed {bounds[0]} is a training seed; evaluation uses evaluation_seeds()")


class SyntheticPairs(Dataset):
    """Indexable synthetic pairs: item ``k`` is :func:`synthetic_pair` of ``seeds[k]``.

    Args:
        seeds: a sequence of int seeds (a ``range`` is never materialised).
        shape, config, labels: as in :func:`synthetic_pair`.
        split: ``"train"`` refuses seeds >= :data:`EVAL_SEED_START`; ``"eval"``
            accepts only those (``ValueError`` otherwise).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int] | None = None,
        config: SyntheticConfig | None = None,
        split: str = "train",
        labels: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.seeds = seeds if isinstance(seeds, range) else tuple(int(s) for s in seeds)
        _check_seeds(self.seeds, split)
        self.shape, self.config, self.labels = shape, config or SyntheticConfig(), labels

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> dict:
        return synthetic_pair(self.seeds[index], self.shape, self.config, self.labels)
