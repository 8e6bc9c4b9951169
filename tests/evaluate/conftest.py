"""Helpers for the evaluation tests: a numpy generator from the session seed."""

import numpy as np
import pytest


@pytest.fixture
def np_rng(rng) -> np.random.Generator:
    """numpy's generator, seeded like the shared ``rng`` (so LUMIREG_TEST_SEED replays it too)."""
    return np.random.default_rng(rng.initial_seed())
