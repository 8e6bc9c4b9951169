"""lumireg.train.synthetic: deterministic random diffeomorphic pairs of the template canvas."""

import numpy as np
import pytest
import torch

from lumireg.contract import CANVAS
from lumireg.train.canvas import LABELS
from lumireg.train.synthetic import (
    EVAL_SEED_START,
    PRESETS,
    SyntheticConfig,
    SyntheticPairs,
    evaluation_seeds,
    random_displacement,
    synthetic_pair,
    training_seeds,
)

SMALL = (40, 56, 48)  # the canvas at 4 mm: fast, same anatomy


@pytest.fixture(scope="module")
def full_pairs():
    """Pairs 11, 11 (again) and 12 at LUMIR's full size."""
    pairs = SyntheticPairs([11, 11, 12])
    return [pairs[k] for k in range(len(pairs))]


def _dice(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-label Dice over LABELS."""
    return np.array(
        [2 * ((a == n) & (b == n)).sum().item() / max(1, ((a == n).sum() + (b == n).sum()).item()) for n in LABELS]
    )


def _jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) by central differences, in float64, for a (1, 3, D, H, W) displacement."""
    u = disp[0].double()
    grads = [torch.gradient(u[c]) for c in range(3)]
    jac = torch.stack([torch.stack([grads[c][a] + float(a == c) for a in range(3)]) for c in range(3)])
    return torch.linalg.det(jac.permute(2, 3, 4, 0, 1))


def test_full_pair_has_lumir_shapes_dtypes_and_uint8_steps(full_pairs):
    sample = full_pairs[0]
    assert set(sample) == {"fixed", "moving", "fixed_labels", "moving_labels", "seed"}
    for key in ("fixed", "moving"):
        image = sample[key]
        assert image.shape == (1, *CANVAS) and image.dtype == torch.float32
        assert image.min() == 0 and image.max() == 1
        assert torch.equal(torch.round(image * 255), image * 255), "not quantised to 1/255"
    for key in ("fixed_labels", "moving_labels"):
        assert sample[key].shape == (1, *CANVAS) and sample[key].dtype == torch.int32
        assert set(sample[key].unique().tolist()) == {0, *LABELS}
    assert sample["seed"] == 11


def test_same_seed_gives_the_same_pair(full_pairs):
    first, again = full_pairs[0], full_pairs[1]
    for key in first:
        assert torch.equal(torch.as_tensor(first[key]), torch.as_tensor(again[key])), key


def test_different_seeds_give_different_pairs(full_pairs):
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        assert not torch.equal(full_pairs[0][key], full_pairs[2][key]), key


def test_fixed_and_moving_are_deformed_differently(full_pairs):
    sample = full_pairs[0]
    assert (sample["fixed"] - sample["moving"]).abs().mean() > 0.02
    assert not torch.equal(sample["fixed_labels"], sample["moving_labels"])


def test_labels_overlap_partly_between_fixed_and_moving(full_pairs):
    for sample in (full_pairs[0], full_pairs[2]):
        dice = _dice(sample["fixed_labels"], sample["moving_labels"])
        # misaligned by a few mm, as unregistered LUMIR pairs are (Dice ~0.55 there)
        assert 0.3 < dice.mean() < 0.9, dice.mean()
        assert dice.min() > 0.05


def _explained_variance(image: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the image's variance explained by its label map (the correlation ratio)."""
    x, groups = image.flatten().double(), labels.flatten().long()
    count = torch.bincount(groups, minlength=len(LABELS) + 1).double()
    means = torch.bincount(groups, x, minlength=len(LABELS) + 1) / count.clamp_min(1)
    return 1 - ((x - means[groups]) ** 2).sum().item() / ((x - x.mean()) ** 2).sum().item()


def test_labels_move_with_their_image(full_pairs):
    # image and labels are warped by one field: each image is explained by its own labels, not the other's
    for sample in full_pairs[:1] + full_pairs[2:]:
        own = [_explained_variance(sample[n], sample[f"{n}_labels"]) for n in ("fixed", "moving")]
        swapped = [
            _explained_variance(sample["fixed"], sample["moving_labels"]),
            _explained_variance(sample["moving"], sample["fixed_labels"]),
        ]
        assert min(own) > 0.85, own
        assert max(swapped) < min(own) - 0.05, (own, swapped)


def test_default_contrast_is_t1_like_and_inversion_flips_it():
    def tissue_means(sample):
        f, labels = sample["fixed"], sample["fixed_labels"]
        return [f[(labels > 0) & ((labels - 1) // 8 == t)].mean().item() for t in range(3)]

    csf, gm, wm = tissue_means(synthetic_pair(3, SMALL, SyntheticConfig(inversion_prob=0, synthetic_prob=0)))
    assert csf < gm < wm
    csf, gm, wm = tissue_means(synthetic_pair(3, SMALL, SyntheticConfig(inversion_prob=1, synthetic_prob=0)))
    assert csf > gm > wm


def test_synthetic_contrast_is_shared_by_the_pair_unless_asked_otherwise():
    def label_means(image, labels):
        return torch.stack([image[labels == n].mean() for n in LABELS])

    def correlation(config):
        s = synthetic_pair(5, SMALL, config)
        a = label_means(s["fixed"], s["fixed_labels"])
        b = label_means(s["moving"], s["moving_labels"])
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert correlation(SyntheticConfig(synthetic_prob=1.0, inversion_prob=0)) > 0.9
    assert correlation(SyntheticConfig(synthetic_prob=1.0, inversion_prob=0, shared_contrast=False)) < 0.9


def test_shape_resamples_the_canvas():
    sample = SyntheticPairs([1], shape=SMALL, labels=False)[0]
    assert set(sample) == {"fixed", "moving", "seed"}
    assert sample["fixed"].shape == sample["moving"].shape == (1, *SMALL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_displacement_is_diffeomorphic_and_a_few_mm(seed):
    rms = SyntheticConfig().velocity_rms_mm[1]
    disp = random_displacement((80, 112, 96), torch.Generator().manual_seed(seed), rms_mm=rms, voxel_mm=(2, 2, 2))
    assert disp.shape == (1, 3, 80, 112, 96) and disp.dtype == torch.float32
    assert _jacobian_determinant(disp).min() > 0
    mean_mm = 2 * disp.norm(dim=1).mean().item()
    assert 0.5 * rms < mean_mm < 3 * rms, mean_mm
    again = random_displacement((80, 112, 96), torch.Generator().manual_seed(seed), rms_mm=rms, voxel_mm=(2, 2, 2))
    assert torch.equal(disp, again)


def test_training_refuses_reserved_evaluation_seeds():
    with pytest.raises(ValueError, match="reserved"):
        SyntheticPairs([3, EVAL_SEED_START + 2], split="train")
    with pytest.raises(ValueError, match="reserved"):
        SyntheticPairs(range(EVAL_SEED_START + 1))  # checked from the range's ends, never iterated
    with pytest.raises(ValueError):
        training_seeds(10, start=EVAL_SEED_START - 5)
    with pytest.raises(ValueError, match="training seed"):
        SyntheticPairs([0], split="eval")


def test_seed_helpers_split_the_seed_space():
    assert training_seeds(3, start=4) == range(4, 7)
    assert evaluation_seeds(2) == range(EVAL_SEED_START, EVAL_SEED_START + 2)
    assert len(SyntheticPairs(evaluation_seeds(5), split="eval")) == 5
    # the training loop's request for run seed s: 10**9 seeds from s * 10**6
    assert len(SyntheticPairs(training_seeds(10**9, start=999 * 10**6))) == 10**9


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError):
        SyntheticConfig(inversion_prob=0.7, synthetic_prob=0.5)
    with pytest.raises(ValueError):
        SyntheticConfig(noise_std=(0.1, 0.0))
    with pytest.raises(ValueError):
        SyntheticPairs([0], split="test")


def test_coarse_component_adds_large_smooth_motion_and_leaves_the_default_stream_alone():
    shape, voxel = (40, 56, 48), (4, 4, 4)
    fine = random_displacement(shape, torch.Generator().manual_seed(5), rms_mm=2.0, voxel_mm=voxel)
    both = random_displacement(shape, torch.Generator().manual_seed(5), rms_mm=2.0, voxel_mm=voxel, coarse=(48.0, 6.0))
    assert _jacobian_determinant(both).min() > 0
    assert 4 * both.norm(dim=1).mean() > 2 * 4 * fine.norm(dim=1).mean()  # mm: the coarse 6 mm dominates
    # the default (lumir) preset draws no coarse component: its pairs are those the first weights saw
    assert torch.equal(synthetic_pair(3, SMALL, PRESETS["lumir"])["fixed"], synthetic_pair(3, SMALL)["fixed"])
    assert not torch.equal(synthetic_pair(3, SMALL, PRESETS["broad"])["fixed"], synthetic_pair(3, SMALL)["fixed"])


def test_broad_preset_moves_labels_further_than_the_lumir_one():
    def overlap(config):  # share of brain voxels whose label agrees between fixed and moving
        pair = synthetic_pair(11, SMALL, config)
        f, m = pair["fixed_labels"], pair["moving_labels"]
        brain = (f > 0) | (m > 0)
        return float((f == m)[brain].float().mean())

    assert overlap(PRESETS["broad"]) < overlap(PRESETS["lumir"])
