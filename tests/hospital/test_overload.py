"""Bounded overload on the real embedded server: a burst past the queue is refused at once, memory stays bounded.

The committed queue policy (max_queue_size 8, 60 s queue timeout, reject) was chosen from
``measure_queue_policy.py`` (README, "Deploying in a hospital"). A burst of 4x that (32 requests) takes minutes and
about 9 GiB on a 2-core CPU, so this test runs the same policy at max_queue_size 2 with 4x as many concurrent
requests (8): every request completes or is refused with UNAVAILABLE, none hangs past the client's timeout, the
server stays ready, its memory stays under the bound, and `lumireg register --pairs` with retries completes every
pair. About 2 minutes on 2 CPU cores.
"""

import os
from collections import Counter

import pytest
from google.protobuf import text_format
from overload import PeakMemory, burst, repository_with_policy, server_rss
from tritonclient.grpc import model_config_pb2

from lumireg.cli import main
from lumireg.contract import ENTRY_MODEL, EXIT_OK
from lumireg.export.repository import MAX_QUEUE_SIZE, QUEUE_TIMEOUT_US, SOURCE_REPOSITORY
from lumireg.service.server import EmbeddedServer, free_ports

QUEUE = 2
BURST = 4 * QUEUE
CLIENT_TIMEOUT_S = 600  # "none hangs": every request has answered before this
# Baseline (both models loaded) about 1.6 GiB; a batch of up to QUEUE + 1 pairs in the stubs about 1 GiB a pair
MEMORY_BOUND_GIB = 6.0


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    root = repository_with_policy(tmp_path_factory.mktemp("repository"), QUEUE, QUEUE_TIMEOUT_US)
    log = tmp_path_factory.mktemp("overload") / "server.log"
    with EmbeddedServer(root, ports=free_ports(), log=log) as running:
        yield running


def test_the_served_model_has_the_measured_queue_policy():
    config = text_format.Parse(
        (SOURCE_REPOSITORY / ENTRY_MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    policy = config.dynamic_batching.default_queue_policy
    assert policy.max_queue_size == MAX_QUEUE_SIZE == 8
    assert policy.default_timeout_microseconds == QUEUE_TIMEOUT_US == 60_000_000
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT


def test_a_burst_past_the_queue_is_refused_with_unavailable_and_memory_stays_bounded(small_queue_server, pair):
    burst(small_queue_server.grpc_url, 1, pair, CLIENT_TIMEOUT_S)  # warm-up
    with PeakMemory(small_queue_server.process.pid) as memory:
        outcomes = burst(small_queue_server.grpc_url, BURST, pair, CLIENT_TIMEOUT_S)
    counts = Counter(outcome for outcome, _ in outcomes)
    assert set(counts) <= {"ok", "StatusCode.UNAVAILABLE"}, counts  # never DEADLINE_EXCEEDED: none hung
    assert counts["ok"] >= 1 and counts["StatusCode.UNAVAILABLE"] >= 1, counts
    assert memory.peak < MEMORY_BOUND_GIB * 2**30, memory.peak / 2**30
    assert small_queue_server.ready()
    assert server_rss(small_queue_server.process.pid) < MEMORY_BOUND_GIB * 2**30


def test_a_batch_with_retries_completes_every_pair_through_the_burst(
    small_queue_server, lumir_pair_files, tmp_path, capsys
):
    fixed, moving = lumir_pair_files
    rows = []
    for n in range(BURST):  # distinct LUMIR names, so each pair has its own output folder
        name = tmp_path / f"LUMIRMRI_{3500 + n}_0000.nii.gz"
        os.symlink(moving, name)
        rows.append(f"{fixed},{name}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    command = ["register", "--pairs", str(tmp_path / "pairs.csv"), "-o", str(out), "--url"]
    command += [small_queue_server.grpc_url, "--concurrency", str(BURST), "--outputs", "displacement"]
    command += ["--transport", "grpc", "--retry-seconds", "600"]
    assert main(command) == EXIT_OK, capsys.readouterr().err
    assert len(list(out.glob("*/displacement.nii.gz"))) == BURST
    assert not list(out.rglob(".partial-*"))
    assert small_queue_server.ready()
