"""Open-loop load test: ``lumireg bench load --rate R --duration S [--url HOST:PORT]``.

Requests (one LUMIR pair each, uint8 160 x 224 x 192) are sent at a fixed
arrival rate of R per second for S seconds, at ``start + i / R`` on a
monotonic clock, whether or not earlier ones have answered (tritonclient's
``async_infer`` with callbacks), so a server slower than R shows a growing
queue. Each request keeps its scheduled, send and completion times (seconds
from the start), its latency (completion - send, s) and its error (the gRPC
status, e.g. ``StatusCode.INVALID_ARGUMENT``, and the server's message).
After the last send the run waits up to ``max(60 s, 10 x p99)`` for the
outstanding answers. ``--bad-request-every N`` sends every N-th request with
a float32 ``fixed`` image, which the server must refuse (to test alerting).
Every request in flight holds its ~14 MB payload, so R far above the server's
throughput for long runs costs client memory.

Results: a summary on the terminal, ``load.json`` and ``load.png`` in ``<out>/<device>/``.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lumireg.benchmarks.machine import device_name, header, slug
from lumireg.benchmarks.serving import (
    add_target_arguments,
    latency_summary,
    sample_batch,
    scrape,
    scrape_counted,
    server_breakdown,
    target,
)
from lumireg.client.transport import payload_inputs
from lumireg.contract import (
    ENTRY_MODEL,
    EXIT_FAILURE,
    EXIT_MISSING_DEPENDENCY,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    OUTPUT_NAMES,
)
from lumireg.service.server import ServerError

DRAIN_MIN_S = 60.0  # the drain timeout is max(DRAIN_MIN_S, 10 x the p99 latency so far)
NO_ANSWER = "no answer before the drain timeout"


def _check(args) -> list[str]:
    """The requested outputs; raises ValueError with a one-line reason for bad options."""
    outputs = [name.strip() for name in str(args.outputs).split(",") if name.strip()]
    unknown = [name for name in outputs if name not in OUTPUT_NAMES]
    if not (math.isfinite(args.rate) and args.rate > 0 and math.isfinite(args.duration) and args.duration > 0):
        raise ValueError(f"--rate and --duration must be > 0, got {args.rate} and {args.duration}")
    if args.bad_request_every is not None and args.bad_request_every < 1:
        raise ValueError(f"--bad-request-every must be >= 1, got {args.bad_request_every}")
    if unknown or not outputs:
        raise ValueError(f"unknown --outputs {unknown or args.outputs!r}; choose from {', '.join(OUTPUT_NAMES)}")
    if "warped_labels" in outputs:
        raise ValueError("--outputs warped_labels needs moving_labels, which the load test does not send")
    return outputs


def _tensors(images: dict, bad: bool) -> list:
    """The pair as tritonclient inputs, made once and reused; ``bad``: ``fixed`` as float32 (the server refuses it)."""
    return payload_inputs({**images, "fixed": images["fixed"].astype(np.float32)} if bad else images)


def send(url: str, rate: float, duration: float, outputs: list[str], bad_every: int | None) -> list[dict]:
    """Send ``ceil(rate x duration)`` requests open loop; one record per request (times in s from the start)."""
    import tritonclient.grpc as grpcclient

    images = sample_batch(1)
    good, bad = _tensors(images, False), _tensors(images, True)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
    count = max(1, math.ceil(rate * duration - 1e-9))
    records = [
        {
            "index": i,
            "bad": bool(bad_every and (i + 1) % bad_every == 0),
            "scheduled_s": i / rate,
            "sent_s": None,
            "completed_s": None,
            "latency_s": None,
            "error": None,
            "message": None,
        }
        for i in range(count)
    ]
    lock, answered = threading.Condition(), [0]
    start = time.monotonic()

    def done(i, result=None, error=None):
        with lock:
            record = records[i]
            if record["completed_s"] is None and record["error"] != NO_ANSWER:
                record["completed_s"] = time.monotonic() - start
                record["latency_s"] = record["completed_s"] - record["sent_s"]
                if error is not None:  # tritonclient's InferenceServerException, or what async_infer raised
                    status = error.status() if hasattr(error, "status") else None
                    record["error"] = str(status or type(error).__name__)
                    record["message"] = error.message() if hasattr(error, "message") else str(error)
                answered[0] += 1
                lock.notify_all()

    with grpcclient.InferenceServerClient(url) as client:
        calls = []
        for record in (bar := tqdm(records, desc="load", unit="req")):
            time.sleep(max(0.0, start + record["scheduled_s"] - time.monotonic()))
            record["sent_s"] = time.monotonic() - start
            try:
                calls.append(
                    client.async_infer(
                        ENTRY_MODEL,
                        bad if record["bad"] else good,
                        functools.partial(done, record["index"]),
                        outputs=requested,
                    )
                )
            except Exception as exc:  # refused before it left
                done(record["index"], error=exc)
            bar.set_postfix_str(f"in flight {record['index'] + 1 - answered[0]}")
        sent_end = time.monotonic()
        with lock:
            while answered[0] < count:
                p99 = latency_summary([r["latency_s"] for r in records if r["completed_s"] and not r["error"]])
                left = sent_end + max(DRAIN_MIN_S, 10 * (p99["p99_ms"] or 0) / 1000) - time.monotonic()
                if left <= 0:
                    break
                lock.wait(min(left, 1.0))
            for record in records:
                if record["completed_s"] is None:
                    record["error"] = NO_ANSWER
                    record["message"] = f"still unanswered {time.monotonic() - sent_end:.1f} s after the last send"
        for call in calls:
            call.cancel()
    return records


def summarize(records: list[dict], rate: float, duration: float) -> dict:
    """Rates (per s), counts, errors, latency overall and per send-time window (ms)."""
    sent = [r for r in records if r["sent_s"] is not None]
    ok = [r for r in sent if r["error"] is None]
    span = sent[-1]["sent_s"] - sent[0]["sent_s"] if len(sent) > 1 else 0.0
    errors = Counter(r["error"] for r in sent if r["error"] is not None)
    examples = {kind: next(r["message"] for r in sent if r["error"] == kind) for kind in errors}
    width = max(1.0, duration / 20)
    windows = []
    for w in range(int(max(r["sent_s"] for r in sent) // width) + 1):
        inside = [r for r in sent if w * width <= r["sent_s"] < (w + 1) * width]
        good = [r["latency_s"] for r in inside if r["error"] is None]
        if inside:
            q = latency_summary(good)
            windows.append(
                {
                    "start_s": w * width,
                    "end_s": (w + 1) * width,
                    "count": len(inside),
                    "failed": len(inside) - len(good),
                    "p50_ms": q["p50_ms"],
                    "p99_ms": q["p99_ms"],
                }
            )
    return {
        "rate_target_per_s": rate,
        # intervals between sends over their span: equals the target when every send is on time (None for 1 send)
        "rate_achieved_per_s": (len(sent) - 1) / span if span > 0 else None,
        "completed_per_s": len(ok) / (max(r["completed_s"] for r in ok) - sent[0]["sent_s"]) if ok else 0.0,
        "duration_s": duration,
        "requests_sent": len(sent),
        "succeeded": len(ok),
        "failed": len(sent) - len(ok),
        "errors_by_type": dict(errors),
        "error_examples": examples,
        "latency": latency_summary([r["latency_s"] for r in ok]),
        "latency_over_time": windows,
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    answered = [r for r in report["requests"] if r["latency_s"] is not None]
    for failed, style in (
        (False, dict(marker=".", color="tab:blue", label="succeeded")),
        (True, dict(marker="x", color="red", label="failed")),
    ):
        points = [(r["sent_s"], r["latency_s"] * 1000) for r in answered if (r["error"] is not None) == failed]
        if points:
            ax.scatter(*zip(*points), **style)
    windows = [w for w in report["latency_over_time"] if w["p50_ms"] is not None]
    for q, style in (("p50", "-"), ("p99", "--")):
        ax.plot(
            [(w["start_s"] + w["end_s"]) / 2 for w in windows],
            [w[f"{q}_ms"] for w in windows],
            style,
            color="black",
            label=f"{q} per window",
        )
    achieved = report["rate_achieved_per_s"]
    ax.set(
        xlabel="send time (s from start)",
        ylabel="latency (ms)",
        title=f"lumireg load: {report['rate_target_per_s']:g} req/s target, "
        f"{achieved or float('nan'):.3g} achieved, {report['device']}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scrape(metrics_url: str, before: dict | str | None = None, succeeded: int = 0) -> dict | str:
    """The metrics endpoint's samples (once Triton has counted ``succeeded`` more successes than ``before``), or why
    they could not be read."""
    try:
        return scrape_counted(metrics_url, before, succeeded) if isinstance(before, dict) else scrape(metrics_url)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def add_arguments(parser) -> None:
    """``lumireg bench load``'s options."""
    parser.description = (
        "Open-loop load test: requests at a fixed arrival rate for a fixed time, whether or not "
        "earlier ones have answered; latency over time and every error, counted by type."
    )
    add_target_arguments(parser)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second (default: 1)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending (default: 30)")
    parser.add_argument(
        "--outputs",
        default="displacement_fp16",
        help="comma-separated outputs each request asks for, from "
        f"{', '.join(n for n in OUTPUT_NAMES if n != 'warped_labels')} (default: displacement_fp16)",
    )
    parser.add_argument(
        "--bad-request-every",
        type=int,
        help="make every N-th request invalid (checks that failures are seen and counted)",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for the results, a sub-folder per device (default: benchmarks/results)",
    )


def run(args) -> int:
    """``lumireg bench load``: EXIT_OK when every request succeeded, EXIT_FAILURE if any failed, EXIT_USAGE for bad
    options, EXIT_UNAVAILABLE without a server, EXIT_MISSING_DEPENDENCY without nvidia-pytriton for the embedded one.

    Uses ``args.url`` (gRPC host:port, or None for the embedded server),
    ``args.metrics_url``, ``args.rate`` (requests/s), ``args.duration`` (s),
    ``args.outputs`` (comma-separated), ``args.bad_request_every`` (N or None)
    and ``args.out`` (results folder; one sub-folder per device).
    """
    try:
        outputs = _check(args)
    except (TypeError, ValueError) as exc:
        print(f"lumireg bench load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    device = device_name()
    out_dir = Path(args.out) / slug(device)
    try:
        with target(args.url, args.metrics_url, out_dir) as (url, metrics_url, what):
            print(f"load test: {args.rate:g} requests/s for {args.duration:g} s ({', '.join(outputs)}), {what}")
            before = _scrape(metrics_url)
            records = send(url, args.rate, args.duration, outputs, args.bad_request_every)
            after = _scrape(metrics_url, before, sum(r["error"] is None for r in records))
    except ServerError as exc:
        print(f"lumireg bench load: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ImportError as exc:
        print(f"lumireg bench load: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    server = next((s for s in (before, after) if isinstance(s, str)), None) or server_breakdown(before, after)
    report = {
        **header("load", device),
        **summarize(records, args.rate, args.duration),
        "server": server,
        "target": what,
        "settings": {
            "url": args.url,
            "metrics_url": metrics_url,
            "rate": args.rate,
            "duration": args.duration,
            "outputs": outputs,
            "bad_request_every": args.bad_request_every,
        },
        "units": {
            "*_s": "seconds from the start (times) or seconds",
            "*_ms": "milliseconds",
            "*_per_s": "requests per second",
        },
        "requests": records,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out_dir / "load.png")
    _print(report, out_dir)
    return EXIT_FAILURE if report["failed"] else EXIT_OK


def _print(report: dict, out_dir: Path) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    lat, achieved = report["latency"], report["rate_achieved_per_s"]
    print(
        f"\nrate {report['rate_target_per_s']:g}/s target, {achieved or float('nan'):.3g}/s achieved, "
        f"{report['completed_per_s']:.3g}/s completed; {report['requests_sent']} sent, "
        f"{report['succeeded']} succeeded, {report['failed']} failed; latency p50 {fmt(lat['p50_ms'])} ms, "
        f"p90 {fmt(lat['p90_ms'])} ms, p99 {fmt(lat['p99_ms'])} ms"
    )
    print(f"{'send window (s)':>16}{'requests':>10}{'failed':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for w in report["latency_over_time"]:
        print(
            f"{w['start_s']:>7.1f}-{w['end_s']:<8.1f}{w['count']:>10}{w['failed']:>8}{fmt(w['p50_ms']):>10}"
            f"{fmt(w['p99_ms']):>10}"
        )
    for kind, count in report["errors_by_type"].items():
        print(f"FAILED: {count} x {kind}: {report['error_examples'][kind]}", file=sys.stderr)
    print(f"wrote {out_dir / 'load.json'} and load.png")
