"""The bundled weights: they load, and they register a held-out pair without folding."""

import numpy as np
import torch

from lumireg.evaluate import as_channels_last, dice, ndv_percent, warp_labels_nearest
from lumireg.network import DEFAULT_WEIGHTS, load_model, read_checkpoint
from lumireg.train.data import LABELS, SyntheticPairs, evaluation_seeds


def test_bundled_weights_are_a_trained_weights_only_checkpoint():
    state = read_checkpoint(DEFAULT_WEIGHTS)
    assert state["step"] >= 1000 and "optimizer" not in state
    assert state["training"]["config"]["data"] == "synthetic"


def test_bundled_weights_align_a_held_out_pair_without_folding():
    sample = SyntheticPairs(evaluation_seeds(1), split="eval")[0]
    model = load_model()
    with torch.inference_mode():
        disp = model(sample["fixed"][None], sample["moving"][None])[0].numpy()
    field = as_channels_last(disp)
    fixed_labels, moving_labels = sample["fixed_labels"][0].numpy(), sample["moving_labels"][0].numpy()
    labels = sorted(LABELS)
    before = np.nanmean(dice(fixed_labels, moving_labels, labels))
    after = np.nanmean(dice(fixed_labels, warp_labels_nearest(moving_labels, field), labels, moving_labels))
    assert after > before + 0.1, (before, after)
    assert ndv_percent(field, sample["moving"][0].numpy() > 0) < 0.01
