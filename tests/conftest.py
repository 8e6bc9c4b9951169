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

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lumireg.contract import DEFAULT_COARSE, DEFAULT_PASSES, intensities_to_uint8  # noqa: E402
from lumireg.export.repository import SOURCE_REPOSITORY  # noqa: E402
from lumireg.kernels import _dispatch  # noqa: E402
from lumireg.service.runner import ensure_exported  # noqa: E402
from lumireg.service.server import EmbeddedServer, free_ports  # noqa: E402


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


# --- the real embedded Triton server, started once per session for the tests that ask for it ---


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``tritonserver`` from nvidia-pytriton on free ports, on the repository that set-up exported."""
    ensure_exported(SOURCE_REPOSITORY)
    log = tmp_path_factory.mktemp("tritonserver") / "server.log"
    with EmbeddedServer(SOURCE_REPOSITORY, ports=free_ports(), log=log) as running:
        yield running


@pytest.fixture(scope="session")
def client(server):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        yield connection


@pytest.fixture(scope="session")
def pair():
    """A held-out synthetic pair on LUMIR's canvas: uint8 images and int32 labels, ``(1, 1, 160, 224, 192)``."""
    from lumireg.train.synthetic import evaluation_seeds, synthetic_pair

    sample = synthetic_pair(evaluation_seeds(3)[2])
    return {
        "fixed": intensities_to_uint8(sample["fixed"].numpy())[None],
        "moving": intensities_to_uint8(sample["moving"].numpy())[None],
        "moving_labels": sample["moving_labels"].numpy().astype(np.int32)[None],
    }


def _in_process(pair, passes: int, coarse: int = DEFAULT_COARSE) -> dict:
    """The bundled network in PyTorch on the test pair, ``passes`` passes after ``coarse`` coarse ones, as the
    server runs them (uint8 between passes): forward and inverse displacement, float32."""
    from lumireg.export.onnx import VelocityGraph
    from lumireg.network.cascade import cascade, cascade_inverse
    from lumireg.network.checkpoint import load_model

    model = load_model()
    fixed, moving = (torch.from_numpy(pair[k]) for k in ("fixed", "moving"))
    with torch.no_grad():
        forward, velocities = cascade(VelocityGraph(model), fixed, moving, passes, coarse=coarse)
        return {"displacement": forward.numpy(), "inverse_displacement": cascade_inverse(velocities).numpy()}


@pytest.fixture(scope="session")
def served_voxels() -> float:
    """How far, in voxels, a served displacement may be from :func:`in_process`'s at any voxel.

    The served network runs in ONNX Runtime, the in-process one in PyTorch: their velocities differ by about 1e-5
    half-resolution voxels (the export's parity check), and the inverse's scaling and squaring composes that
    difference with itself 7 times; the largest voxel measured 1.01e-3 with the fine-tuned weights.
    """
    return 2e-3


@pytest.fixture(scope="session")
def in_process(pair):
    """What the server answers by default (``passes`` at its default), computed in process."""
    return _in_process(pair, DEFAULT_PASSES)


@pytest.fixture(scope="session")
def in_process_one_pass(pair):
    """One full-resolution network pass, no coarse pass: swapping the images gives exactly its inverse."""
    return _in_process(pair, 1, coarse=0)


@pytest.fixture(scope="session")
def in_process_two_passes(pair):
    """Two network passes, composed, computed in process."""
    return _in_process(pair, 2)


@pytest.fixture(scope="session")
def network():
    """The bundled network as the server runs it, in PyTorch: ``(fixed, moving) -> velocity`` on uint8 tensors."""
    from lumireg.export.onnx import VelocityGraph
    from lumireg.network.checkpoint import load_model

    graph = VelocityGraph(load_model())

    def run(fixed, moving):
        with torch.no_grad():
            return graph(fixed, moving)

    return run
