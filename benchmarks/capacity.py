"""Capacity on paper: ``lumireg bench capacity [--replicas 1,2,4,8] [--device-dir DIR]``.

A discrete-event simulation of N lumireg servers behind one balancing client, fed by a measured service time:

- service time: a lognormal fitted to one run of ``lumireg bench service`` (``service.json``; by default the
  gRPC, displacement_fp16, batch-1, concurrency-1 run, which is what ``lumireg bench load`` sends): median = its
  p50, and its p90 at the lognormal's 90th percentile; a run of 4 requests pins the spread only roughly;
- arrivals: Poisson at rate R requests/s (many independent senders), or evenly spaced (``lumireg bench load``);
- routing: round robin over the replicas, as gRPC's ``round_robin`` does for one client;
- each server, as the model's config has it (:mod:`lumireg.export.repository`): one instance; Triton's dynamic
  batcher takes up to ``MAX_BATCH_SIZE`` waiting requests at once, and a batch of b costs ``b ** e`` service
  times, e fitted to the report's batch runs (:func:`service_time`; on the Xeon a batch of 4 took 4.4x one
  pair), 1 when it has batch 1 only; a request that finds ``MAX_QUEUE_SIZE`` waiting, or waits longer than
  ``QUEUE_TIMEOUT_US``, is refused (the client would retry it; here it is counted as refused, not resent).

Latencies are seconds from send to answer of the requests served. The check: the simulated percentiles of each
measured load test's own schedule (its rate and request count, evenly spaced, many repetitions: a median and a
5..95 % band) against what that load test measured (every ``load*.json`` in the device folder).

Results: ``capacity.json`` and ``capacity.png`` in the device folder (default: this machine's); ``--service``
takes the service report from elsewhere (one measured beside the load test, under the same conditions).
"""

from __future__ import annotations

import json
import math
import sys
from collections import deque
from pathlib import Path

import numpy as np

from lumireg.benchmarks.machine import device_name, header, slug
from lumireg.contract import EXIT_OK, EXIT_USAGE, MAX_BATCH_SIZE
from lumireg.export.repository import MAX_QUEUE_SIZE, QUEUE_TIMEOUT_US

Z90 = 1.2815515655446004  # the standard normal's 90th percentile
SERVICE_RUN = {"transport": "grpc", "outputs": "displacement_fp16", "batch": 1, "concurrency": 1}


def service_time(service_report: dict, match: dict = SERVICE_RUN) -> dict:
    """The lognormal of the first run of ``service_report`` whose fields equal ``match``: ``{"median_s",
    "sigma", "mean_s", "batch_exponent", "run"}`` (sigma of the log, at least 0.01); ``ValueError`` when no run
    matches. ``batch_exponent``: a batch of b costs ``b ** batch_exponent`` service times, fitted (least squares
    in log-log, within 0.5..1.5) to the report's batch runs at concurrency 1; 1.0 when it has one batch size."""
    run = next((r for r in service_report["runs"] if all(r.get(k) == v for k, v in match.items())), None)
    if run is None:
        raise ValueError(f"no run with {match} in the service report")
    median = run["p50_ms"] / 1000
    sigma = max(0.01, math.log(max(run["p90_ms"], run["p50_ms"]) / run["p50_ms"]) / Z90)
    batches = {
        r["batch"]: r["p50_ms"] for r in service_report["runs"] if r.get("kind") == "batch" and r["concurrency"] == 1
    }
    exponent = 1.0
    if 1 in batches and len(batches) > 1:
        x = np.log([b for b in batches if b > 1])
        y = np.log([batches[b] / batches[1] for b in batches if b > 1])
        exponent = float(np.clip((x @ y) / (x @ x), 0.5, 1.5))
    return {
        "median_s": median,
        "sigma": sigma,
        "mean_s": median * math.exp(sigma**2 / 2),
        "batch_exponent": exponent,
        "run": run,
    }


def simulate_server(arrivals: np.ndarray, times: np.ndarray, batch_exponent: float = 1.0) -> tuple[list[float], int]:
    """One server: ``arrivals`` (s, ascending) and one service time per request (s) -> the latencies (s) of the
    requests served, in serving order, and how many were refused (full queue, or queued beyond the timeout).
    A batch of b costs its requests' mean service time times ``b ** batch_exponent``."""
    timeout = QUEUE_TIMEOUT_US / 1e6
    latencies, refused, waiting, free, i, n = [], 0, deque(), 0.0, 0, len(arrivals)
    while i < n or waiting:
        if waiting and (i >= n or free <= arrivals[i]):
            start = max(free, arrivals[waiting[0]])
            while waiting and start - arrivals[waiting[0]] > timeout:
                waiting.popleft()
                refused += 1
            if not waiting:
                continue
            batch = [waiting.popleft() for _ in range(min(MAX_BATCH_SIZE, len(waiting)))]
            free = start + float(times[batch].mean()) * len(batch) ** batch_exponent
            latencies += [free - arrivals[k] for k in batch]
        else:
            if len(waiting) >= MAX_QUEUE_SIZE:
                refused += 1
            else:
                waiting.append(i)
            i += 1
    return latencies, refused


def simulate(rate: float, replicas: int, service: dict, requests: int, rng, poisson: bool = True) -> dict:
    """``requests`` arrivals at ``rate`` per s over ``replicas`` servers (round robin): latency percentiles (s) of
    those served, the fraction refused, and the servers' utilisation (offered work / capacity)."""
    gaps = rng.exponential(1 / rate, requests) if poisson else np.full(requests, 1 / rate)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    times = rng.lognormal(math.log(service["median_s"]), service["sigma"], requests)
    latencies, refused = [], 0
    for k in range(replicas):
        served, lost = simulate_server(arrivals[k::replicas], times[k::replicas], service.get("batch_exponent", 1.0))
        latencies += served
        refused += lost
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) if latencies else (math.nan,) * 3
    return {
        "rate_per_s": rate,
        "replicas": replicas,
        "p50_s": float(p50),
        "p90_s": float(p90),
        "p99_s": float(p99),
        "refused_fraction": refused / requests,
        "utilisation": rate * service["mean_s"] / replicas,
    }


def check_against_load(load: dict, service: dict, rng, repeats: int = 400) -> dict:
    """The load test's schedule (its rate, its request count, evenly spaced) simulated ``repeats`` times on one
    server: each percentile's median and 5..95 % band (ms), beside what the load test measured (ms)."""
    rate, count = load["rate_target_per_s"], load["requests_sent"]
    runs = [simulate(rate, 1, service, count, rng, poisson=False) for _ in range(repeats)]
    out = {"rate_per_s": rate, "requests": count, "measured_ms": {}, "predicted_ms": {}}
    for q in ("p50", "p90", "p99"):
        values = np.array([r[f"{q}_s"] for r in runs]) * 1000
        out["measured_ms"][q] = load["latency"][f"{q}_ms"]
        out["predicted_ms"][q] = {
            "median": float(np.median(values)),
            "band_5_95": [float(np.percentile(values, 5)), float(np.percentile(values, 95))],
        }
    return out


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, refused) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    servers = report["settings"]["replicas"]
    for n, color in zip(servers, plt.cm.viridis(np.linspace(0, 0.85, len(servers)))):
        rows = [r for r in report["curves"] if r["replicas"] == n]
        rates = [r["rate_per_s"] for r in rows]
        ax.plot(rates, [r["p50_s"] for r in rows], "-", color=color, label=f"{n} server{'s' * (n > 1)}: p50")
        ax.plot(rates, [r["p99_s"] for r in rows], "--", color=color, label=f"{n}: p99")
        refused.plot(rates, [100 * r["refused_fraction"] for r in rows], "-", color=color, label=f"{n}")
    for n, check in enumerate(report["checks"]):
        for q, marker in (("p50", "o"), ("p99", "s")):
            low, high = check["predicted_ms"][q]["band_5_95"]
            ax.errorbar(
                check["rate_per_s"],
                check["predicted_ms"][q]["median"] / 1000,
                yerr=[
                    [(check["predicted_ms"][q]["median"] - low) / 1000],
                    [(high - check["predicted_ms"][q]["median"]) / 1000],
                ],
                fmt="none",
                ecolor="grey",
                capsize=4,
            )
            label = f"load test {q}, evenly spaced (grey: predicted 5..95 %)" if n == 0 else None
            ax.plot(check["rate_per_s"], check["measured_ms"][q] / 1000, marker, color="red", label=label)
    service = report["service_time"]
    ax.set(
        xlabel="arrival rate (requests/s, Poisson)",
        ylabel="latency (s)",
        yscale="log",
        title=f"lumireg capacity: service {service['median_s']:.2f} s median, {report['device']}",
    )
    ax.legend(fontsize=7, ncol=2)
    refused.set(xlabel="arrival rate (requests/s)", ylabel="refused (%)", title="queue full or timed out")
    refused.legend(title="servers", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser) -> None:
    """``lumireg bench capacity``'s options."""
    parser.description = (
        "Latency percentiles against arrival rate for 1..N servers, simulated from the measured service time "
        "(service.json) and the model's queue policy; checked against the load test (load.json)."
    )
    parser.add_argument("--replicas", default="1,2,4,8", help="server counts to simulate (default: 1,2,4,8)")
    parser.add_argument(
        "--device-dir",
        help="folder with service.json (and load.json) that also receives the results "
        "(default: benchmarks/results/<this machine>)",
    )
    parser.add_argument("--service", help="the service benchmark's JSON to fit (default: DEVICE_DIR/service.json)")
    parser.add_argument("--requests", type=int, default=20000, help="simulated requests per point (default: 20000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def run(args) -> int:
    """``lumireg bench capacity``: EXIT_OK, or EXIT_USAGE (one line) for bad options or a missing service.json."""
    try:
        replicas = sorted({int(v) for v in str(args.replicas).split(",") if v.strip()})
        if not replicas or replicas[0] < 1 or args.requests < 100:
            raise ValueError(f"--replicas needs positive integers and --requests >= 100, got {args.replicas!r}")
        folder = Path(args.device_dir or Path("benchmarks/results") / slug(device_name()))
        service_path = Path(args.service or folder / "service.json")
        source = json.loads(service_path.read_text())
        service = service_time(source)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"lumireg bench capacity: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rng = np.random.default_rng(args.seed)
    top = max(replicas) / service["mean_s"]  # every server fully busy
    rates = np.linspace(top / 40, top * 1.1, 45)
    curves = [
        simulate(float(r), n, service, args.requests, rng)
        for n in replicas
        for r in rates
        if r / n <= 1.1 / service["mean_s"]
    ]
    checks = []
    for path in sorted(folder.glob("load*.json")):
        checks.append({"load_json": path.name, **check_against_load(json.loads(path.read_text()), service, rng)})
    report = {
        **header("capacity", source.get("device", folder.name)),
        "settings": {
            "replicas": replicas,
            "requests_per_point": args.requests,
            "seed": args.seed,
            "max_batch_size": MAX_BATCH_SIZE,
            "max_queue_size": MAX_QUEUE_SIZE,
            "queue_timeout_s": QUEUE_TIMEOUT_US / 1e6,
            "routing": "round robin",
            "service_json": str(service_path),
            "service_json_commit": source.get("commit"),
        },
        "service_time": {k: v for k, v in service.items() if k != "run"},
        "curves": curves,
        "checks": checks,
        "units": {"*_s": "seconds", "*_ms": "milliseconds", "rate_per_s": "requests per second"},
    }
    (folder / "capacity.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, folder / "capacity.png")
    per_server = 1 / service["mean_s"]
    print(
        f"service time: median {service['median_s']:.2f} s, sigma {service['sigma']:.3f}: "
        f"{per_server:.3f} requests/s a server"
    )
    for check in checks:
        for q in ("p50", "p90", "p99"):
            p = check["predicted_ms"][q]
            print(
                f"load test at {check['rate_per_s']:g}/s ({check['requests']} requests): {q} measured "
                f"{check['measured_ms'][q]:.0f} ms, predicted {p['median']:.0f} ms (5..95 %: "
                f"{p['band_5_95'][0]:.0f}..{p['band_5_95'][1]:.0f})"
            )
    print(f"wrote {folder / 'capacity.json'} and capacity.png")
    return EXIT_OK
