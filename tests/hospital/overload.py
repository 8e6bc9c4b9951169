"""Bursts of concurrent requests and the server's resident memory: the burst test and the queue-policy measurement.

``server_rss`` sums the resident memory of tritonserver and its python-backend stubs (its process group: the
launcher starts it in a new session). ``burst`` sends ``n`` displacement-only requests at once, each from its own
thread, and returns each one's outcome: ``"ok"`` or its gRPC status, and its seconds. ``answered`` counts a
server's successful requests (its metrics endpoint) and ``wait_in_flight`` waits until it is in the middle of one.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lumireg.benchmarks.serving import scrape, total
from lumireg.client.transport import payload_inputs
from lumireg.contract import ENTRY_MODEL, NETWORK_MODEL
from lumireg.export.repository import SOURCE_REPOSITORY, write_repository


def server_rss(pid: int) -> int:
    """Bytes resident in every process of the process group ``pid`` (the server and its stubs)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pid:
                continue
            with open(f"/proc/{entry}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


class PeakMemory:
    """Samples :func:`server_rss` every ``every`` seconds in a thread while in the ``with`` block; ``peak``."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every, self.peak, self._stop = pid, every, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, server_rss(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def answered(metrics_url: str, model: str = ENTRY_MODEL) -> int:
    """Requests ``model`` has answered with success (``nv_inference_request_success`` on ``metrics_url``)."""
    return int(total(scrape(metrics_url), "nv_inference_request_success_total", model=model))


def wait_in_flight(metrics_url: str, going: Callable[[], bool], timeout: float = 300.0) -> int | None:
    """Wait until the server at ``metrics_url`` is in the middle of a request: its network model has answered more
    often than its entry model since the call (the entry model asks the network model, then integrates and
    answers). Returns the entry model's answers since the call, or None if ``going()`` turned false or ``timeout``
    seconds passed first. Polled every 0.05 s."""
    entry, network = answered(metrics_url), answered(metrics_url, NETWORK_MODEL)
    deadline = time.monotonic() + timeout
    while going() and time.monotonic() < deadline:
        done = answered(metrics_url) - entry
        if answered(metrics_url, NETWORK_MODEL) - network > done:
            return done
        time.sleep(0.05)
    return None


def burst(url: str, n: int, pair: dict, timeout: float, credentials: dict | None = None) -> list[tuple[str, float]]:
    """``n`` concurrent requests (displacement_fp16 only, gRPC payloads); each one's (outcome, seconds)."""
    inputs = {"fixed": pair["fixed"], "moving": pair["moving"]}
    start_line = threading.Barrier(n)

    def one(_) -> tuple[str, float]:
        with grpcclient.InferenceServerClient(url, **(credentials or {})) as client:
            start_line.wait()
            start = time.monotonic()
            try:
                result = client.infer(
                    ENTRY_MODEL,
                    payload_inputs(inputs),
                    outputs=[grpcclient.InferRequestedOutput("displacement_fp16")],
                    client_timeout=timeout,
                )
                assert np.isfinite(result.as_numpy("displacement_fp16")).all()
                return "ok", time.monotonic() - start
            except InferenceServerException as exc:
                return str(exc.status()), time.monotonic() - start

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def repository_with_policy(root: Path, max_queue_size: int | None, timeout_us: int) -> Path:
    """A model repository in ``root`` like the source tree's, with another queue policy (the network linked)."""
    from lumireg.export import repository

    write_repository(root)
    (root / repository.ENTRY_MODEL / "config.pbtxt").write_text(repository.entry_config(max_queue_size, timeout_us))
    for name in ("model.onnx", "export.json"):
        source = SOURCE_REPOSITORY / NETWORK_MODEL / "1" / name
        target = root / NETWORK_MODEL / "1" / name
        if source.exists() and not target.exists():
            target.symlink_to(source)
    shutil.copy2(SOURCE_REPOSITORY / "README.md", root / "README.md") if (
        SOURCE_REPOSITORY / "README.md"
    ).exists() else None
    return root
