"""Many servers behind one client (``--url a,b,c``): a batch spreads over all of them, a server SIGKILLed with a
request in flight is left out and that request is sent again elsewhere, a restarted server takes work again, and a
hung one (SIGSTOP, its connection open) is dropped by the client's keepalive and its request sent elsewhere.
Each server's share is its own count on its metrics endpoint (``nv_inference_request_success`` of ``lumireg``).
Three embedded servers on loopback ports, started once for the module; small batches of displacement-only pairs."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from overload import answered, wait_in_flight

from lumireg.cli import main
from lumireg.client import RegistrationClient
from lumireg.client.registration import RETRY_STATUSES
from lumireg.contract import EXIT_OK
from lumireg.export.repository import SOURCE_REPOSITORY
from lumireg.service.runner import ensure_exported
from lumireg.service.server import EmbeddedServer, free_ports

SERVERS = 3


def _server(folder, n: int, ports=None) -> EmbeddedServer:
    return EmbeddedServer(SOURCE_REPOSITORY, ports=ports or free_ports(), log=folder / f"server{n}.log")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Three running servers (a list: a test may replace one it restarted); all stopped at the end."""
    ensure_exported(SOURCE_REPOSITORY)
    folder = tmp_path_factory.mktemp("many-servers")
    running = [_server(folder, n) for n in range(SERVERS)]
    ports = [p for s in running for p in (s.ports.grpc, s.ports.http, s.ports.metrics)]
    assert len(set(ports)) == len(ports)
    try:
        with ThreadPoolExecutor(SERVERS) as pool:
            list(pool.map(EmbeddedServer.start, running))
        yield running
    finally:
        for server in running:
            server.stop()


def _url(servers) -> str:
    return ",".join(s.grpc_url for s in servers)


def _succeeded(server) -> int:
    return answered(server.metrics_url)


def _counts_after(servers, before: list[int], expected: int, timeout: float = 10.0) -> list[int]:
    """Each server's successes since ``before``, once they add up to ``expected`` (Triton counts a request just
    after answering it) or ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [_succeeded(s) - b for s, b in zip(servers, before)]
        if sum(counts) >= expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def _batch(servers, pairs_file: str, out) -> list[str]:
    return ["register", "--pairs", pairs_file, "-o", str(out), "--url", _url(servers), "--outputs", "displacement"]


def _written(out) -> list[str]:
    return sorted(p.parent.name for p in out.glob("*/displacement.nii.gz"))


def test_a_batch_spreads_over_every_server(servers, pairs_csv, attempts, tmp_path):
    out = tmp_path / "out"
    before = [_succeeded(s) for s in servers]
    assert main(_batch(servers, pairs_csv(4), out) + ["--concurrency", "3"]) == EXIT_OK
    assert len(_written(out)) == 4
    counts = _counts_after(servers, before, 4)
    assert sum(counts) == 4 and all(c >= 1 for c in counts), counts  # each pair once, every server a share
    assert attempts == ["ok"] * 4


def test_a_server_killed_mid_request_is_left_out_and_its_pair_is_sent_elsewhere(
    servers, pairs_csv, attempts, tmp_path, capsys
):
    victim, survivors = servers[0], servers[1:]
    out, codes = tmp_path / "out", []
    before = [_succeeded(s) for s in survivors]
    command = _batch(servers, pairs_csv(4), out) + ["--concurrency", "3", "--retry-seconds", "120"]
    worker = threading.Thread(target=lambda: codes.append(main(command)))
    worker.start()
    try:
        done = wait_in_flight(victim.metrics_url, worker.is_alive)
        assert done is not None, "the victim never had a request in flight"
        os.killpg(victim.process.pid, signal.SIGKILL)  # the server and its python stubs, as a crash would
        victim.stop()
    finally:
        worker.join(600)
    assert codes == [EXIT_OK], capsys.readouterr().err
    assert len(_written(out)) == 4 and not list(out.rglob(".partial-*"))  # every pair once, whole
    assert attempts.count("ok") == 4  # no pair registered twice
    failed = [a for a in attempts if a != "ok"]
    assert failed and set(failed) <= RETRY_STATUSES, attempts  # the request in flight failed and was sent again
    counts = _counts_after(survivors, before, 4 - done)
    assert sum(counts) >= 4 - done, (counts, done)  # what the victim had not answered, the survivors did


def test_a_restarted_server_takes_work_again(servers, pair, attempts, tmp_path):
    victim = servers[0]
    assert not victim.running()  # killed by the test before
    with RegistrationClient(_url(servers)) as client:
        images = {k: pair[k][0, 0] for k in ("fixed", "moving")}

        def register(_):
            return client.register(images["fixed"], images["moving"], ("displacement",))

        register(0)
        assert attempts == ["ok"]  # the dead server is not tried: gRPC's round robin skips it
        servers[0] = _server(tmp_path, 0, victim.ports).start()
        # the client's channel reconnects to it within its reconnection backoff (at most 5 s)
        taken = 0
        for _ in range(4):
            with ThreadPoolExecutor(SERVERS) as pool:
                list(pool.map(register, range(SERVERS)))
            taken = _succeeded(servers[0])
            if taken:
                break
    assert taken >= 1
    assert set(attempts) == {"ok"}


def test_a_hung_server_is_dropped_by_keepalive_and_its_pair_sent_elsewhere(
    servers, pairs_csv, attempts, tmp_path, capsys
):
    victim = servers[1]
    out, codes = tmp_path / "out", []
    command = _batch(servers, pairs_csv(3), out) + ["--concurrency", "3", "--retry-seconds", "120"]
    worker = threading.Thread(target=lambda: codes.append(main(command)))
    worker.start()
    stopped = False
    try:
        stopped = wait_in_flight(victim.metrics_url, worker.is_alive) is not None
        assert stopped, "the victim never had a request in flight"
        os.killpg(victim.process.pid, signal.SIGSTOP)  # hung: its connection stays open, nothing answers
        worker.join(300)  # keepalive: no answer to a ping within 10 s, at most 20 s after the last one
    finally:
        if stopped:
            os.killpg(victim.process.pid, signal.SIGCONT)
        worker.join(300)
    assert codes == [EXIT_OK], capsys.readouterr().err
    assert len(_written(out)) == 3 and attempts.count("ok") == 3
    assert "StatusCode.UNAVAILABLE" in attempts, attempts  # the hung server's request failed and was sent again
