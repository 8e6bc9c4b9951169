"""The real embedded Triton server, started once for the service tests, and a LUMIR-shaped test pair."""

import numpy as np
import pytest
import torch

from lumireg.export.repository import SOURCE_REPOSITORY
from lumireg.service.runner import ensure_exported
from lumireg.service.server import EmbeddedServer, free_ports


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
    as_u8 = lambda x: np.clip(np.rint(x.numpy() * 255), 0, 255).astype(np.uint8)[None]  # noqa: E731
    return {"fixed": as_u8(sample["fixed"]), "moving": as_u8(sample["moving"]),
            "moving_labels": sample["moving_labels"].numpy().astype(np.int32)[None]}


@pytest.fixture(scope="session")
def in_process(pair):
    """The bundled network in PyTorch on the test pair: forward and inverse displacement, float32."""
    from lumireg.network.checkpoint import load_model

    model = load_model()
    with torch.no_grad():
        forward, inverse = model.forward_and_inverse(*(torch.from_numpy(pair[k]).float() / 255 for k in ("fixed", "moving")))
    return {"displacement": forward.numpy(), "inverse_displacement": inverse.numpy()}
