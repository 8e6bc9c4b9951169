"""Faults survived: the only server SIGKILLed with a request in flight during a batch and restarted on its ports
(the request is lost, the client's shared-memory registrations with it: the client registers them again and sends
the request again); a model's python-backend stub SIGKILLed mid-request under ``lumireg serve`` (tritonserver 2.51
never restarts it: the supervisor restarts tritonserver on its ports, the client retries through the gap); the disk
filling while results are written.
(A server stopped with SIGTERM and restarted: tests/client/test_client.py::test_batch_survives_a_server_restart.)"""

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import pytest
from overload import burst, wait_in_flight

from lumireg.cli import main
from lumireg.client.registration import RETRY_STATUSES, STUB_DIED
from lumireg.client.transport import SharedMemoryTransport
from lumireg.contract import ENTRY_MODEL, EXIT_FAILURE, EXIT_OK, NETWORK_MODEL
from lumireg.export.repository import SOURCE_REPOSITORY
from lumireg.service.server import EmbeddedServer, free_ports, python_stubs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``lumireg serve`` (its supervisor is under test) on free ports in a child process, ready. Yields an
    :class:`EmbeddedServer` on its ports, not started here (its URLs and health), with ``serve`` (the child) and
    ``log`` (the child's output)."""
    ports = free_ports()
    log = tmp_path_factory.mktemp("faults") / "serve.log"
    command = [sys.executable, "-m", "lumireg", "serve", "--grpc-port", str(ports.grpc)]
    command += ["--http-port", str(ports.http), "--metrics-port", str(ports.metrics)]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    view = EmbeddedServer(SOURCE_REPOSITORY, ports=ports, log=log)
    view.serve = process
    try:
        _restarted(view, None, 180)
        yield view
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def _tritonserver(served) -> int:
    """The pid of the tritonserver that ``lumireg serve`` runs now (its child, the leader of its process group)."""
    children = Path(f"/proc/{served.serve.pid}/task/{served.serve.pid}/children").read_text().split()
    return int(children[0]) if children else 0


def _restarted(served, old: int | None, timeout: float) -> int:
    """Wait until ``lumireg serve`` runs a tritonserver other than ``old`` and it answers ready; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and served.serve.poll() is None:
        triton = _tritonserver(served)
        if triton not in (0, old) and served.ready():
            return triton
        time.sleep(0.1)
    raise AssertionError(f"no tritonserver ready again within {timeout:g} s:\n{served.log.read_text()[-3000:]}")


def _stub(triton: int, model: str) -> tuple[int, set[str]]:
    """The pid of the python-backend stub running ``model`` in tritonserver ``triton``, and every stub's region."""
    stubs = python_stubs(triton)
    pid = next(pid for pid, (instance, _) in stubs.items() if instance.rsplit("_", 1)[0] == model)
    return pid, {region for _, region in stubs.values()}


def test_a_stub_killed_mid_request_fails_that_request_and_lumireg_serve_restarts_the_server(served, pair):
    assert burst(served.grpc_url, 1, pair, 300)[0][0] == "ok"  # warm
    triton = _tritonserver(served)
    stub, regions = _stub(triton, ENTRY_MODEL)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.extend(burst(served.grpc_url, 1, pair, 300)))
    worker.start()
    assert wait_in_flight(served.metrics_url, worker.is_alive) is not None, "no request in flight"
    os.kill(stub, signal.SIGKILL)
    killed = time.monotonic()
    worker.join(300)
    failed = time.monotonic() - killed
    # INTERNAL "Stub process 'lumireg_0' is not healthy." after about 1 s; UNAVAILABLE if the restart came first
    assert outcome[0][0] in ("StatusCode.INTERNAL", "StatusCode.UNAVAILABLE") and failed < 10, (outcome, failed)
    _restarted(served, triton, 120)
    back = time.monotonic() - killed
    print(f"in-flight request failed {failed:.1f} s after the kill, server ready again after {back:.1f} s")
    assert back < 60
    assert burst(served.grpc_url, 1, pair, 300)[0][0] == "ok"
    assert not any(Path("/dev/shm", r).exists() for r in regions)  # the killed server's stub regions unlinked
    said = [line for line in served.log.read_text().splitlines() if "died" in line]
    assert said == [
        f"lumireg serve: the python backend process of model instance {ENTRY_MODEL}_0 died: "
        "restarting tritonserver on the same ports"
    ], said


def test_a_batch_with_retries_completes_every_pair_when_a_stub_dies_mid_request(
    served, pairs_csv, attempts, tmp_path, capsys
):
    out, codes = tmp_path / "out", []
    command = ["register", "--pairs", pairs_csv(3), "-o", str(out), "--url", served.grpc_url]
    command += ["--outputs", "displacement", "--concurrency", "1", "--retry-seconds", "120"]
    triton = _tritonserver(served)
    stub, _ = _stub(triton, NETWORK_MODEL)  # this time the network's: its error reaches the client inside lumireg's
    worker = threading.Thread(target=lambda: codes.append(main(command)))
    worker.start()
    try:
        assert wait_in_flight(served.metrics_url, worker.is_alive) is not None, "no request in flight"
        os.kill(stub, signal.SIGKILL)
    finally:
        worker.join(600)
    assert codes == [EXIT_OK], capsys.readouterr().err
    assert len(list(out.glob("*/displacement.nii.gz"))) == 3 and not list(out.rglob(".partial-*"))
    assert attempts.count("ok") == 3, attempts  # no pair registered twice
    assert set(attempts) - {"ok"} <= RETRY_STATUSES | {STUB_DIED[0]}, attempts
    assert _tritonserver(served) != triton and f"{NETWORK_MODEL}_0 died" in served.log.read_text()


def _client_regions() -> set[str]:
    """This process's client shared-memory regions in /dev/shm (:class:`SharedMemoryTransport`'s names)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"lumireg_{os.getpid()}_")}


def test_the_only_server_killed_mid_batch_and_restarted_the_batch_completes_over_shared_memory(
    pairs_csv, attempts, tmp_path, monkeypatch, capsys
):
    resets = []
    real_reset = SharedMemoryTransport.reset
    monkeypatch.setattr(SharedMemoryTransport, "reset", lambda self, client: resets.append(real_reset(self, client)))
    ports, log, out, codes = free_ports(), tmp_path / "server.log", tmp_path / "out", []
    command = ["register", "--pairs", pairs_csv(3), "-o", str(out), "--url", f"127.0.0.1:{ports.grpc}"]
    command += ["--outputs", "displacement", "--concurrency", "1", "--transport", "shm", "--retry-seconds", "120"]
    server = EmbeddedServer(SOURCE_REPOSITORY, ports=ports, log=log).start()
    worker = threading.Thread(target=lambda: codes.append(main(command)))
    try:
        worker.start()
        deadline = time.monotonic() + 300  # the first pair done: the client's regions are registered
        while not list(out.glob("*/displacement.nii.gz")) and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert wait_in_flight(server.metrics_url, worker.is_alive) is not None, "no request in flight"
        os.killpg(server.process.pid, signal.SIGKILL)  # the server and its python stubs, as a crash would
        killed = time.monotonic()
        server.stop()
        server = EmbeddedServer(SOURCE_REPOSITORY, ports=ports, log=log).start()
        print(f"restarted {time.monotonic() - killed:.1f} s after the SIGKILL")
        worker.join(300)
    finally:
        server.stop()
        worker.join(300)
    assert codes == [EXIT_OK], capsys.readouterr().err
    assert len(list(out.glob("*/displacement.nii.gz"))) == 3 and not list(out.rglob(".partial-*"))
    assert attempts.count("ok") == 3, attempts  # no pair registered twice
    failed = [a for a in attempts if a != "ok"]
    assert failed and set(failed) <= RETRY_STATUSES, attempts  # the request in flight was lost and sent again
    assert resets, "the client never registered its shared memory again"
    assert not _client_regions()  # nothing left in /dev/shm by the client


def test_a_full_disk_fails_the_pair_cleanly_and_keeps_finished_pairs(server, pairs_csv, tmp_path, monkeypatch, capsys):
    saved = []
    real_save = nib.save

    def save_until_full(image, filename):
        if saved:  # the first file fits; then the disk is full, half a file written
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(image, filename)
        saved.append(filename)

    monkeypatch.setattr(nib, "save", save_until_full)
    out = tmp_path / "out"
    command = ["register", "--pairs", pairs_csv(2), "-o", str(out)]
    command += ["--url", server.grpc_url, "--outputs", "displacement", "--concurrency", "1"]
    assert main(command) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "No space left on device" in err and "displacement.nii.gz" in err, err
    assert len(list(out.glob("*/displacement.nii.gz"))) == 1  # the finished pair is kept
    assert not list(out.rglob(".partial-*"))  # nothing partial
