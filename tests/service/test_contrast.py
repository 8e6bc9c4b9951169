"""Request parameter ``contrast``: a moving image in another contrast is registered as if it were in the fixed one's."""

import json

import numpy as np
import pytest
import torch

from lumireg.benchmarks.independent_pairs import independent_pair
from lumireg.contract import DEFAULT_CONTRAST, intensities_to_uint8
from lumireg.network.contrast import OTHER_CONTRAST_BELOW, brain_correlation, decide
from lumireg.service.pipeline import register_in_process


def _other_contrast(image: np.ndarray) -> np.ndarray:
    """Brain intensities through a tent: mid-grey brightest, both ends dark (no monotonic map undoes it)."""
    value = image.astype(np.float64)
    return np.where(image > 0, np.clip(255 - np.abs(2 * value - 255), 1, 255), 0).astype(np.uint8)


def test_contrast_other_registers_a_pair_of_two_contrasts_like_the_pair_of_one(network, pair, in_process):
    moving = _other_contrast(pair["moving"])
    same = in_process["displacement"]  # the network on the pair of one contrast
    plain = register_in_process(network, pair["fixed"], moving, ["displacement"], contrast="same")
    plain = plain["displacement"].numpy()
    other = register_in_process(network, pair["fixed"], moving, ["displacement"], contrast="other")
    error_plain, error_other = (np.abs(d - same).mean() for d in (plain, other["displacement"].numpy()))
    assert error_other < 0.6 * error_plain, (error_other, error_plain)


def _uint8(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(intensities_to_uint8(array))[None]


@pytest.mark.parametrize("index", [0, 1])
def test_brain_correlation_tells_t1_against_t2_from_t1_against_t1(index):
    # the independent generator's pairs, before any registration: one pair in one contrast, then in two
    shape = (40, 56, 48)
    one = independent_pair(index, shape, labels=False)
    two = independent_pair(index, shape, labels=False, contrasts=("t1", "t2"))
    fixed, same, other = _uint8(one["fixed"]), _uint8(one["moving"]), _uint8(two["moving"])
    r_same, r_other = brain_correlation(torch.cat([fixed, fixed]), torch.cat([same, other])).tolist()
    assert r_same > 0.3 and r_other < -0.1, (r_same, r_other)
    assert [d["used"] for d in decide(torch.cat([fixed, fixed]), torch.cat([same, other]), "auto")] == ["same", "other"]
    # asked for explicitly, the request wins whatever the images say
    assert [d["used"] for d in decide(torch.cat([fixed, fixed]), torch.cat([same, other]), "same")] == ["same"] * 2
    # no brain voxel in common, or a constant image: no verdict, and no map
    empty, constant = torch.zeros_like(fixed), torch.where(fixed > 0, 100, 0).to(torch.uint8)
    assert brain_correlation(torch.cat([fixed, fixed]), torch.cat([empty, constant])).isnan().all()
    assert [d["used"] for d in decide(torch.cat([fixed, fixed]), torch.cat([empty, constant]), "auto")] == ["same"] * 2
    assert OTHER_CONTRAST_BELOW < r_same


def test_auto_is_the_default_and_maps_only_the_pair_of_two_contrasts(network, pair):
    assert DEFAULT_CONTRAST == "auto"
    moving = np.where(pair["moving"] > 0, 256 - pair["moving"].astype(np.int32), 0).astype(np.uint8)  # inverted
    fixed2, moving2 = np.concatenate([pair["fixed"]] * 2), np.concatenate([pair["moving"], moving])
    wanted = ["displacement", "qc"]
    auto = register_in_process(network, fixed2, moving2, wanted)
    same = register_in_process(network, pair["fixed"], pair["moving"], wanted, contrast="same")
    other = register_in_process(network, pair["fixed"], moving, wanted, contrast="other")
    # in one batch, each pair gets what it needs: bit for bit what asking for it gives
    torch.testing.assert_close(auto["displacement"][:1], same["displacement"], rtol=0, atol=0)
    torch.testing.assert_close(auto["displacement"][1:], other["displacement"], rtol=0, atol=0)
    reports = [json.loads(report)["contrast"] for report in auto["qc"]]
    assert [(r["requested"], r["used"]) for r in reports] == [("auto", "same"), ("auto", "other")]
    assert reports[0]["brain_correlation"] > OTHER_CONTRAST_BELOW > reports[1]["brain_correlation"]
    assert json.loads(other["qc"][0])["contrast"]["used"] == "other"
