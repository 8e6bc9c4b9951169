"""What the service benchmark and the load test share: the server they aim at, its metrics, the test pair.

- :func:`target`: a running server (``--url``) or the embedded one started for the run
  (:func:`add_target_arguments`: the options that choose it);
- :func:`scrape` and :func:`server_breakdown`: Triton's Prometheus counters
  (``nv_inference_*``, parsed with ``prometheus_client``) and lumireg's stage
  histograms, differenced between two scrapes, per request;
- :func:`sample_batch`: a held-out synthetic LUMIR pair, repeated to a batch;
- :func:`latency_summary`: p50 / p90 / p99.
"""

from __future__ import annotations

import time
import urllib.request
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lumireg.contract import ENTRY_MODEL, intensities_to_uint8
from lumireg.service.server import ServerError

# Triton's cumulative per-model counters, microseconds, -> the names the reports use (per request, ms)
TRITON_STAGES = {
    "queue": "nv_inference_queue_duration_us",
    "compute_input": "nv_inference_compute_input_duration_us",
    "compute_infer": "nv_inference_compute_infer_duration_us",
    "compute_output": "nv_inference_compute_output_duration_us",
    "request": "nv_inference_request_duration_us",
}


def add_target_arguments(parser) -> None:
    """``--url`` and ``--metrics-url``: the server a benchmark measures (see :func:`target`)."""
    parser.add_argument("--url", help="the server's gRPC host:port (default: start the embedded server for the run)")
    parser.add_argument("--metrics-url", help="its Prometheus endpoint (default: http://HOST:8002/metrics)")


def _check_ready(url: str) -> None:
    """:class:`ServerError` unless the server at ``url`` answers and its entry model is ready."""
    import tritonclient.grpc as grpcclient

    try:
        with grpcclient.InferenceServerClient(url) as client:
            ready = client.is_server_ready(client_timeout=10) and client.is_model_ready(ENTRY_MODEL, client_timeout=10)
    except Exception as exc:  # tritonclient's InferenceServerException: unreachable, refused, timed out
        raise ServerError(f"no server answers at {url}: {exc}") from exc
    if not ready:
        raise ServerError(f"the server at {url} is not ready to serve model {ENTRY_MODEL!r}")


@contextmanager
def target(url: str | None, metrics_url: str | None, log_dir: Path):
    """Yield ``(grpc_url, metrics_url, what)``: the given server, or the embedded one on free ports for the run.

    Raises :class:`ServerError` when the server at ``url`` is not ready or the embedded one cannot start, and
    ``ModuleNotFoundError`` when the embedded one is asked for without nvidia-pytriton.
    """
    if url:
        _check_ready(url)
        host = url.rsplit(":", 1)[0]
        yield url, metrics_url or f"http://{host}:8002/metrics", f"server at {url}"
        return
    from lumireg.export.repository import SOURCE_REPOSITORY
    from lumireg.service.runner import ensure_exported
    from lumireg.service.server import EmbeddedServer, free_ports

    if find_spec("pytriton") is None:
        raise ModuleNotFoundError(
            "the embedded server needs nvidia-pytriton (pip install 'lumireg[server]'); "
            "or measure a running server with --url",
            name="pytriton",
        )
    ensure_exported(SOURCE_REPOSITORY)
    log_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedServer(SOURCE_REPOSITORY, ports=free_ports(), log=log_dir / "tritonserver.log") as server:
        yield server.grpc_url, server.metrics_url, "embedded tritonserver (nvidia-pytriton), started for this run"


def scrape(metrics_url: str) -> dict[tuple, float]:
    """Every sample on the metrics endpoint: ``{(sample name, sorted label items): value}``."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_counted(
    metrics_url: str, before: dict, succeeded: int, model: str = ENTRY_MODEL, timeout: float = 5.0
) -> dict[tuple, float]:
    """:func:`scrape`, again until Triton has counted ``succeeded`` more successes of ``model`` than ``before`` has
    (it counts a request just after answering it) or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(metrics_url)
        counted = total(after, "nv_inference_request_success_total", model=model) - total(
            before, "nv_inference_request_success_total", model=model
        )
        if counted >= succeeded or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def total(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, items), value in samples.items()
        if sample == name and all(dict(items).get(k) == v for k, v in labels.items())
    )


def server_breakdown(before: dict, after: dict, model: str = "lumireg") -> dict:
    """Per successful request of ``model`` between two scrapes: Triton's stages and lumireg's, in ms.

    Returns ``{"requests", "executions", "queue_ms", "compute_input_ms",
    "compute_infer_ms", "compute_output_ms", "request_ms", "lumireg_stages_ms":
    {stage: ms per request}}``; zeros when no request succeeded.
    """

    def delta(name: str, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    requests = delta("nv_inference_request_success_total", model=model)
    per = (lambda value: value / requests) if requests else (lambda value: 0.0)
    out = {"requests": int(requests), "executions": int(delta("nv_inference_exec_count_total", model=model))}
    for stage, counter in TRITON_STAGES.items():
        out[f"{stage}_ms"] = per(delta(f"{counter}_total", model=model)) / 1000
    stages = {dict(items)["stage"] for (name, items) in after if name == "lumireg_stage_seconds_sum"}
    out["lumireg_stages_ms"] = {s: per(delta("lumireg_stage_seconds_sum", stage=s)) * 1000 for s in sorted(stages)}
    return out


def sample_batch(batch: int) -> dict[str, np.ndarray]:
    """``fixed`` / ``moving``: uint8 ``(batch, 1, 160, 224, 192)``, a held-out synthetic pair repeated."""
    from lumireg.train.synthetic import evaluation_seeds, synthetic_pair

    pair = synthetic_pair(evaluation_seeds(1)[0], labels=False)
    return {k: np.repeat(intensities_to_uint8(pair[k].numpy())[None], batch, 0) for k in ("fixed", "moving")}


def latency_summary(seconds: list[float]) -> dict:
    """p50 / p90 / p99 / mean in ms of a list of latencies in seconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1000
    if values.size == 0:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(values.mean())}
