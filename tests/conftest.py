"""Test set-up shared by every test.

Without a GPU the Triton kernels run under Triton's interpreter, which must be
switched on before any kernel is defined, so before ``lumireg.kernels`` is
imported. On a GPU host they compile for the GPU and run on CUDA tensors.
"""

import os
import zlib

import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if TRITON_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from lumireg.kernels import _dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element left unwritten fails the comparison."""
    monkeypatch.setattr(_dispatch, "poison_outputs", True)


@pytest.fixture
def triton_device() -> str:
    """Where Triton-path tensors live: CUDA on a GPU host, else CPU under the interpreter."""
    return TRITON_DEVICE


# Fresh random inputs every run; LUMIREG_TEST_SEED=<the seed in the header> replays a run.
SESSION_SEED = int(os.environ.get("LUMIREG_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"lumireg test seed: LUMIREG_TEST_SEED={SESSION_SEED}; Triton kernels on {TRITON_DEVICE}"


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded from the session seed and the test's id."""
    return torch.Generator().manual_seed(SESSION_SEED + zlib.crc32(request.node.nodeid.encode()))
