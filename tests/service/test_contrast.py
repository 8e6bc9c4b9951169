"""Request parameter ``contrast``: a moving image in another contrast is registered as if it were in the fixed one's."""

import numpy as np

from lumireg.service.pipeline import register_in_process


def _other_contrast(image: np.ndarray) -> np.ndarray:
    """Brain intensities through a tent: mid-grey brightest, both ends dark (no monotonic map undoes it)."""
    value = image.astype(np.float64)
    return np.where(image > 0, np.clip(255 - np.abs(2 * value - 255), 1, 255), 0).astype(np.uint8)


def test_contrast_other_registers_a_pair_of_two_contrasts_like_the_pair_of_one(network, pair, in_process):
    moving = _other_contrast(pair["moving"])
    same = in_process["displacement"]  # the network on the pair of one contrast
    plain = register_in_process(network, pair["fixed"], moving, ["displacement"])["displacement"].numpy()
    other = register_in_process(network, pair["fixed"], moving, ["displacement"], contrast="other")
    error_plain, error_other = (np.abs(d - same).mean() for d in (plain, other["displacement"].numpy()))
    assert error_other < 0.6 * error_plain, (error_other, error_plain)
