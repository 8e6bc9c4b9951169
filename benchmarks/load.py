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

Server memory (``memory`` in the results): when the server is a tritonserver
of this host (the embedded one, or ``--url`` on a loopback address whose
gRPC port a local tritonserver listens on), the summed PSS (proportional set
size, ``Pss`` of ``/proc/<pid>/smaps_rollup``: shared pages such as the
stubs' ``/dev/shm`` regions split among the processes mapping them; ``VmRSS``
of ``/proc/<pid>/status`` where smaps_rollup is missing) of tritonserver and
its python-backend stubs, sampled every ``min(1 s, duration / 20)`` (at least
0.1 s) from the first send until the last answer. Warm-up is the first
:data:`WARMUP_FRACTION` of the sending time; two windows
``max(`` :data:`WINDOW_FRACTION` ``x duration, interval)`` wide are compared,
the first after warm-up and the last of the sending time, each by its floor
(lowest sample), median and peak: growth (%) = 100 x (floor of the last
window - floor of the first) / the latter. The floor, because within each
request the server's memory rises by several hundred MiB and falls back:
what a window's median or mean says depends on the share of time spent in a
request and on how the sampling and arrival periods beat (a 5 s sampling
against arrivals every 4.8 s swings with a 100 s period), while the floor is
the memory the server keeps between requests, where a leak shows; sampling
every second catches it between requests up to about 70 % of capacity. The
peaks' growth is reported beside it. The slope (MiB/min) of a least-squares
line through the samples after warm-up tells a steady climb from a step.
A server on another host: memory not measured.

Shared memory (``shared_memory``): the names in ``/dev/shm`` before the
embedded server started and after it stopped (for ``--url``: before and
after the run, the server still running); ``new`` ones mapped by a live
process (``/proc/*/maps``) are ``in_use``, the others ``leaked``. The load
test itself sends tensors in the gRPC messages, no client regions.

``checks``: no failed request, growth below :data:`MAX_GROWTH_PERCENT` (None
when not measured), no leaked region; ``verdict``: "pass" unless a check is
False. ``--soak`` writes ``soak.json`` / ``soak.png`` instead and fails
(exit 1) unless the verdict is "pass"; without it only failed requests do.

Results: a summary on the terminal, ``load.json`` and ``load.png`` (plot: latency, and server memory over time
below it) in ``<out>/<device>/``.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import os
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
from lumireg.service.server import ServerError, is_loopback, python_stubs

DRAIN_MIN_S = 60.0  # the drain timeout is max(DRAIN_MIN_S, 10 x the p99 latency so far)
NO_ANSWER = "no answer before the drain timeout"
WARMUP_FRACTION = 0.2  # server memory: the first 20 % of the sending time is warm-up
WINDOW_FRACTION = 0.1  # the memory windows compared are 10 % of the sending time wide
MAX_GROWTH_PERCENT = 5.0  # the soak's limit on memory growth after warm-up
FLOOR_TRACE_S = 30.0  # the plot's running floor: the lowest sample of the last 30 s
SHM = Path("/dev/shm")
MEASURE = "pss" if Path("/proc/self/smaps_rollup").exists() else "rss"  # what memory_mib reads


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


def server_process(url: str) -> int | None:
    """The pid of the tritonserver of this host whose ``--grpc-port`` is ``url``'s port (``url`` on a loopback
    address), or None: another host, or no such process visible here."""
    host, port = url.rsplit(":", 1)
    if not is_loopback(host):
        return None
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"tritonserver") and f"--grpc-port={port}".encode() in argv:
            return int(entry)
    return None


def memory_mib(pid: int) -> float:
    """PSS of process ``pid`` in MiB (its RSS where the kernel has no smaps_rollup: see :data:`MEASURE`)."""
    path, key = (f"/proc/{pid}/smaps_rollup", "Pss:") if MEASURE == "pss" else (f"/proc/{pid}/status", "VmRSS:")
    line = next(line for line in Path(path).read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) / 1024  # kB


class MemorySampler:
    """Every ``interval`` s on a thread, from :meth:`start` to :meth:`stop`: ``samples`` gets ``{"t_s": seconds
    from ``origin``, "mib": summed :func:`memory_mib` of tritonserver ``pid`` and its live python stubs,
    "processes": how many}`` (nothing for a tick where the server has gone)."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval, self.samples = pid, interval, []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, origin: float) -> None:
        """Sample from now; ``origin``: the run's start on ``time.monotonic()``."""
        self.origin = origin
        self._thread.start()

    def _run(self) -> None:
        tick = 0
        while True:
            try:
                pids = [self.pid, *python_stubs(os.getpgid(self.pid))]
                mib = sum(memory_mib(pid) for pid in pids)
                self.samples.append({"t_s": time.monotonic() - self.origin, "mib": mib, "processes": len(pids)})
            except (OSError, StopIteration):  # the server, or a stub, went between listing and reading
                pass
            tick += 1
            if self._stopped.wait(max(0.0, self.origin + tick * self.interval - time.monotonic())):
                return

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()


def memory_summary(samples: list[dict], duration: float, interval: float) -> dict:
    """The server's memory after warm-up (MiB, %), as the module docstring defines it: the two windows compared
    (``first_window`` and ``last_window``: ``{"start_s", "end_s", "floor_mib", "median_mib", "peak_mib"}``, None
    without samples), growth of their floors and of their peaks, max and slope after warm-up, and the samples."""
    warmup, width = WARMUP_FRACTION * duration, max(WINDOW_FRACTION * duration, interval)

    def window(lo: float, hi: float) -> dict | None:
        inside = [s["mib"] for s in samples if lo <= s["t_s"] <= hi]
        if not inside:
            return None
        return {
            "start_s": lo,
            "end_s": hi,
            "floor_mib": float(min(inside)),
            "median_mib": float(np.median(inside)),
            "peak_mib": float(max(inside)),
        }

    def growth(key: str) -> float | None:
        return 100 * (last[key] - first[key]) / first[key] if first and last and first[key] else None

    first, last = window(warmup, warmup + width), window(duration - width, duration)
    after = [s["mib"] for s in samples if s["t_s"] > warmup]
    trend = [(s["t_s"], s["mib"]) for s in samples if warmup < s["t_s"] <= duration]
    return {
        "measured": True,
        "measure": "PSS (/proc/<pid>/smaps_rollup)" if MEASURE == "pss" else "RSS (/proc/<pid>/status VmRSS)",
        "interval_s": interval,
        "warmup_s": warmup,
        "window_s": width,
        "first_window": first,
        "last_window": last,
        "max_after_warmup_mib": max(after) if after else None,
        "growth_percent": growth("floor_mib"),  # the check: what the server keeps between requests
        "peak_growth_percent": growth("peak_mib"),
        # least-squares slope of the samples after warm-up, up to the last send: a leak's steady climb
        "slope_after_warmup_mib_per_min": float(np.polyfit(*zip(*trend), 1)[0] * 60) if len(trend) > 1 else None,
        "samples": samples,
    }


def shm_names() -> list[str]:
    """The names in ``/dev/shm`` now (sorted; empty where there is no ``/dev/shm``)."""
    return sorted(os.listdir(SHM)) if SHM.is_dir() else []


def shared_memory_report(before: list[str], after: list[str], scope: str) -> dict:
    """``before``, ``after``, ``new`` (in after, not before), and of the new ones those mapped by a live process
    (``in_use``) and the rest (``leaked``)."""
    new = sorted(set(after) - set(before))
    mapped = set()
    for entry in filter(str.isdigit, os.listdir("/proc")) if new else ():
        try:
            maps = Path(f"/proc/{entry}/maps").read_text()
        except OSError:
            continue
        mapped |= {name for name in new if f"{SHM}/{name}" in maps}
    return {
        "scope": scope,
        "before": before,
        "after": after,
        "new": new,
        "in_use": sorted(mapped),
        "leaked": [name for name in new if name not in mapped],
    }


def send(
    url: str,
    rate: float,
    duration: float,
    outputs: list[str],
    bad_every: int | None,
    started=lambda origin: None,
) -> list[dict]:
    """Send ``ceil(rate x duration)`` requests open loop; one record per request (times in s from the start).
    ``started(origin)`` is called with the start (``time.monotonic()``) just before the first send."""
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
    started(start)

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

    memory = report["memory"]
    if memory["measured"]:
        fig, (ax, below) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(2, 1))
    else:
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
        title=f"lumireg {report['benchmark']}: {report['rate_target_per_s']:g} req/s target, "
        f"{achieved or float('nan'):.3g} achieved, {report['failed']} failed, {report['device']}",
    )
    ax.legend()
    if memory["measured"]:
        times, mib = [m["t_s"] for m in memory["samples"]], [m["mib"] for m in memory["samples"]]
        below.plot(times, mib, color="tab:green", linewidth=0.6, label="samples")
        # the floor as it goes: the lowest sample of the 30 s before each one
        floor = [min(mib[bisect.bisect_left(times, t - FLOOR_TRACE_S) : i + 1]) for i, t in enumerate(times)]
        below.plot(times, floor, color="darkgreen", linewidth=1.5, label=f"floor over {FLOOR_TRACE_S:.0f} s")
        below.axvline(memory["warmup_s"], color="gray", linestyle=":", label="end of warm-up")
        for key, label in (("first_window", "windows compared (floor dashed)"), ("last_window", None)):
            if memory[key]:
                span = memory[key]
                below.axvspan(span["start_s"], span["end_s"], color="tab:green", alpha=0.12, label=label)
                below.hlines(span["floor_mib"], span["start_s"], span["end_s"], color="black", linestyle="--")
        growth = memory["growth_percent"]
        below.set(
            xlabel="time (s from start)",
            ylabel=f"server {MEASURE.upper()} (MiB)",
            title=f"tritonserver + python stubs; floor growth after warm-up "
            f"{_percent(growth)} %, leaked /dev/shm regions: "
            f"{len(report['shared_memory']['leaked'])}",
        )
        below.legend()
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
        "--soak",
        action="store_true",
        help=f"a soak run: write soak.json / soak.png, fail unless no request failed, server memory grew less than "
        f"{MAX_GROWTH_PERCENT:g} %% after warm-up and no /dev/shm region leaked",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for the results, a sub-folder per device (default: benchmarks/results)",
    )


def run(args) -> int:
    """``lumireg bench load``: EXIT_OK when every request succeeded (with ``--soak``: when the verdict is "pass"),
    EXIT_FAILURE otherwise, EXIT_USAGE for bad options, EXIT_UNAVAILABLE without a server, EXIT_MISSING_DEPENDENCY
    without nvidia-pytriton for the embedded one.

    Uses ``args.url`` (gRPC host:port, or None for the embedded server),
    ``args.metrics_url``, ``args.rate`` (requests/s), ``args.duration`` (s),
    ``args.outputs`` (comma-separated), ``args.bad_request_every`` (N or None),
    ``args.soak`` (bool; absent: False) and ``args.out`` (results folder; one sub-folder per device).
    """
    try:
        outputs = _check(args)
    except (TypeError, ValueError) as exc:
        print(f"lumireg bench load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    device = device_name()
    out_dir = Path(args.out) / slug(device)
    name = "soak" if getattr(args, "soak", False) else "load"
    interval = min(1.0, max(0.1, args.duration / 20))
    shm_before = shm_names()
    try:
        with target(args.url, args.metrics_url, out_dir) as (url, metrics_url, what):
            print(f"load test: {args.rate:g} requests/s for {args.duration:g} s ({', '.join(outputs)}), {what}")
            pid = server_process(url)
            sampler = MemorySampler(pid, interval) if pid else None
            before = _scrape(metrics_url)
            try:
                records = send(
                    url,
                    args.rate,
                    args.duration,
                    outputs,
                    args.bad_request_every,
                    sampler.start if sampler else lambda origin: None,
                )
            finally:
                if sampler:
                    sampler.stop()
            after = _scrape(metrics_url, before, sum(r["error"] is None for r in records))
    except ServerError as exc:
        print(f"lumireg bench load: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ImportError as exc:
        print(f"lumireg bench load: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    server = next((s for s in (before, after) if isinstance(s, str)), None) or server_breakdown(before, after)
    summary = summarize(records, args.rate, args.duration)
    memory = (
        memory_summary(sampler.samples, args.duration, interval)
        if sampler
        else {"measured": False, "reason": f"no tritonserver of this host serves {url}: memory not measured"}
    )
    shared = shared_memory_report(
        shm_before,
        shm_names(),
        "before and after the run, the server still running"
        if args.url
        else "before the server started, after it stopped",
    )
    growth = memory.get("growth_percent")
    checks = {
        "no_failed_requests": summary["failed"] == 0,
        "memory_growth_below_limit": None if growth is None else growth < MAX_GROWTH_PERCENT,
        "no_leaked_shared_memory": not shared["leaked"],
    }
    report = {
        **header(name, device),
        **summary,
        "verdict": "fail" if False in checks.values() else "pass",
        "checks": checks,
        "memory": memory,
        "shared_memory": shared,
        "server": server,
        "target": what,
        "settings": {
            "url": args.url,
            "metrics_url": metrics_url,
            "rate": args.rate,
            "duration": args.duration,
            "outputs": outputs,
            "bad_request_every": args.bad_request_every,
            "soak": name == "soak",
            "max_growth_percent": MAX_GROWTH_PERCENT,
            "warmup_fraction": WARMUP_FRACTION,
            "window_fraction": WINDOW_FRACTION,
        },
        "units": {
            "*_s": "seconds from the start (times) or seconds",
            "*_ms": "milliseconds",
            "*_per_s": "requests per second",
            "*_mib": "MiB (2^20 bytes)",
            "*_percent": "percent",
        },
        "requests": records,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out_dir / f"{name}.png")
    _print(report, out_dir / f"{name}.json")
    failed = report["verdict"] == "fail" if name == "soak" else report["failed"] > 0
    return EXIT_FAILURE if failed else EXIT_OK


def _window(window: dict | None) -> str:
    return "-" if window is None else f"{window['floor_mib']:.0f} / {window['peak_mib']:.0f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _print(report: dict, path: Path) -> None:
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
    memory, shared = report["memory"], report["shared_memory"]
    if memory["measured"]:
        growth = memory["growth_percent"]
        print(
            f"server {memory['measure']}, floor / peak: {_window(memory['first_window'])} MiB after warm-up "
            f"({memory['warmup_s']:.0f} s), {_window(memory['last_window'])} MiB at the end; floor growth "
            f"{_percent(growth)} %, peak growth {_percent(memory['peak_growth_percent'])} %, "
            f"slope {memory['slope_after_warmup_mib_per_min']:+.2f} "
            f"MiB/min ({len(memory['samples'])} samples)"
        )
    else:
        print(memory["reason"])
    print(
        f"/dev/shm, {shared['scope']}: {len(shared['new'])} new ({len(shared['in_use'])} in use), "
        f"leaked: {', '.join(shared['leaked']) or 'none'}"
    )
    failed = [check for check, passed in report["checks"].items() if passed is False]
    print(f"verdict: {report['verdict']} ({', '.join(failed) or 'no check failed'})")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
