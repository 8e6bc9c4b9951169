"""Service benchmark: latency and throughput of the served model across batch sizes, concurrency and transports.

``lumireg bench service [--url HOST:PORT] [--batch-sizes 1,2,4,8] [--concurrency 1,2,4,8] [--requests N]``
against a running server, or against the embedded one started for the run.
Every run sends full LUMIR pairs (uint8, 160 x 224 x 192) after ``--warmup``
untimed requests; closed loop: each of C client threads sends its next request
when the last one answered. Runs:

- ``batch``: batch sizes at concurrency 1 (shared memory, float16 field);
- ``concurrency``: client concurrency at batch 1 (the dynamic batcher may merge);
- ``variant``: at batch 1, concurrency 1, the transports (gRPC payload vs
  system shared memory), the field precision (float16 vs float32) and the
  outputs (displacement only vs displacement + warped + QC);
- ``in-process``: the same ONNX network and post-processing called directly in
  this process on the same device (:func:`lumireg.service.pipeline.register_in_process`),
  so the service overhead is a ratio.

Per run: p50 / p90 / p99 latency per request (ms), throughput (pairs/s),
payload bytes per pair each way (the tensors' sizes, whatever the transport),
and the server's own breakdown per request from Triton's metrics (queue,
compute input, infer, output; and lumireg's stages), differenced around the
run. Results: a table, ``service.json``, ``service.csv`` and ``service.png``
in ``<out>/<device>/``.
"""

from __future__ import annotations

import csv
import json
import sys
import threading
import time
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
from lumireg.client.transport import OUTPUT_TYPES, output_nbytes
from lumireg.contract import EXIT_FAILURE, EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from lumireg.service.server import ServerError

DEFAULTS = {  # GPU: enough requests for a p99; CPU (~1.5 s a pair): a few, so the sweep takes minutes
    "cuda": {"batch_sizes": "1,2,4,8", "concurrency": "1,2,4,8", "requests": 50, "warmup": 5},
    "cpu": {"batch_sizes": "1,2,4,8", "concurrency": "1,2,4,8", "requests": 4, "warmup": 1},
}
FIELD = {"float16": "displacement_fp16", "float32": "displacement"}
VARIANTS = [  # (transport, precision, outputs) at batch 1, concurrency 1
    ("grpc", "float16", ("displacement_fp16",)),
    ("shm", "float16", ("displacement_fp16",)),
    ("grpc", "float32", ("displacement",)),
    ("shm", "float32", ("displacement",)),
    ("shm", "float16", ("displacement_fp16", "warped", "qc")),
]
CSV_FIELDS = (
    "kind",
    "transport",
    "outputs",
    "batch",
    "concurrency",
    "requests",
    "pairs",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "pairs_per_s",
    "bytes_in_per_pair",
    "bytes_out_per_pair",
    "server_queue_ms",
    "server_compute_input_ms",
    "server_compute_infer_ms",
    "server_compute_output_ms",
    "server_request_ms",
)


def _payload(outputs, batch: int) -> tuple[int, int]:
    """Bytes per pair in (the uint8 pair) and out (the fixed-size outputs; a QC report is ~0.2 kB)."""
    pair_in = 2 * int(np.prod(OUTPUT_TYPES["warped"][1]))  # two uint8 volumes of the canvas
    out = sum(output_nbytes(name, batch) for name in outputs if OUTPUT_TYPES[name][0] is not np.object_) // batch
    return pair_in, out


def measure(
    url: str,
    metrics_url: str,
    transport: str,
    outputs,
    batch: int,
    concurrency: int,
    requests: int,
    warmup: int,
    images: dict,
) -> dict:
    """One closed-loop run; the result row (see the module docstring)."""
    from lumireg.client import RegistrationClient

    inputs = {name: images[name][:batch] for name in ("fixed", "moving")}
    outputs = list(outputs)
    with RegistrationClient(url, transport=transport, concurrency=concurrency, retry_seconds=0) as client:
        for _ in range(warmup):
            client.infer(inputs, outputs)
        before = scrape(metrics_url)
        latencies, lock = [], threading.Lock()
        left = [requests]

        def worker():
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                start = time.perf_counter()
                client.infer(inputs, outputs)
                with lock:
                    latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        after = scrape_counted(metrics_url, before, len(latencies))
    bytes_in, bytes_out = _payload(outputs, batch)
    if len(latencies) != requests:
        raise RuntimeError(f"{requests - len(latencies)} of {requests} requests failed (see the errors above)")
    return {
        "transport": transport,
        "outputs": "+".join(outputs),
        "batch": batch,
        "concurrency": concurrency,
        "requests": requests,
        "pairs": requests * batch,
        "wall_s": wall,
        **latency_summary(latencies),
        "pairs_per_s": requests * batch / wall,
        "bytes_in_per_pair": bytes_in,
        "bytes_out_per_pair": bytes_out,
        "server": server_breakdown(before, after),
    }


def measure_in_process(device: str, requests: int, warmup: int, images: dict, batch: int = 1) -> dict:
    """The served computation called directly (the network as the server runs it + post-processing) on ``batch``
    pairs at once, float16 field."""
    import torch

    from lumireg.export.repository import SOURCE_REPOSITORY, network_path
    from lumireg.service.pipeline import network_runner, register_in_process

    network = network_runner(network_path(SOURCE_REPOSITORY), torch.device(device))
    pair = {name: images[name][:batch] for name in ("fixed", "moving")}

    def once():
        out = register_in_process(network, pair["fixed"], pair["moving"], ["displacement_fp16"], device=device)
        out["displacement_fp16"].cpu()

    for _ in range(warmup):
        once()
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        once()
        latencies.append(time.perf_counter() - start)
    return {
        "transport": "in-process",
        "outputs": "displacement_fp16",
        "batch": batch,
        "concurrency": 1,
        "requests": requests,
        "pairs": requests * batch,
        "wall_s": sum(latencies),
        **latency_summary(latencies),
        "pairs_per_s": requests * batch / sum(latencies),
        "bytes_in_per_pair": 0,
        "bytes_out_per_pair": 0,
        "server": None,
    }


def _ints(text: str, name: str) -> list[int]:
    values = [int(v) for v in str(text).split(",") if v.strip()]
    if not values or min(values) < 1:
        raise ValueError(f"--{name} needs positive integers, got {text!r}")
    return values


def add_arguments(parser) -> None:
    """``lumireg bench service``'s options; those left unset take the device's :data:`DEFAULTS`."""
    gpu, cpu = DEFAULTS["cuda"], DEFAULTS["cpu"]
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    add_target_arguments(parser)
    parser.add_argument(
        "--batch-sizes", help=f"batch sizes at concurrency 1, at most 8 (default: {cpu['batch_sizes']})"
    )
    parser.add_argument("--concurrency", help=f"client concurrencies at batch 1 (default: {cpu['concurrency']})")
    parser.add_argument(
        "--requests", type=int, help=f"timed requests per run (default: GPU {gpu['requests']}, CPU {cpu['requests']})"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help=f"untimed requests before each run (default: GPU {gpu['warmup']}, CPU {cpu['warmup']})",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for the results, a sub-folder per device (default: benchmarks/results)",
    )


def run(args) -> int:
    """``lumireg bench service``: EXIT_OK when every run completed, EXIT_FAILURE if one failed, EXIT_USAGE for bad
    options, EXIT_UNAVAILABLE without a server, EXIT_MISSING_DEPENDENCY without torch or nvidia-pytriton."""
    try:
        import torch
    except ImportError as exc:
        print(f"lumireg bench service needs {exc.name}: pip install 'lumireg[server]'", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, value in DEFAULTS[device].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    try:
        batches, concurrencies = _ints(args.batch_sizes, "batch-sizes"), _ints(args.concurrency, "concurrency")
        if args.requests < 1 or args.warmup < 0 or max(batches) > 8:
            raise ValueError(
                f"need --requests >= 1, --warmup >= 0 and batch sizes <= 8 (the model's limit); got "
                f"{args.requests}, {args.warmup}, {batches}"
            )
    except (TypeError, ValueError) as exc:
        print(f"lumireg bench service: {exc}", file=sys.stderr)
        return EXIT_USAGE
    name = device_name(device == "cuda")
    out_dir = Path(args.out) / slug(name)
    plan = [("batch", "shm", ("displacement_fp16",), b, 1) for b in batches]
    plan += [("concurrency", "shm", ("displacement_fp16",), 1, c) for c in concurrencies]
    plan += [("variant", t, o, 1, 1) for t, _, o in VARIANTS]
    rows = []
    try:
        with target(args.url, args.metrics_url, out_dir) as (url, metrics_url, what):
            print(f"service benchmark on {name}, {what}")
            images = sample_batch(max(batches))
            for kind, transport, outputs, batch, concurrency in (bar := tqdm(plan, desc="service", unit="run")):
                bar.set_postfix_str(f"{kind} {transport} B={batch} C={concurrency}")
                requests = max(args.requests, 2 * concurrency) if kind == "concurrency" else args.requests
                row = measure(url, metrics_url, transport, outputs, batch, concurrency, requests, args.warmup, images)
                rows.append({"kind": kind, **row})
        rows.append({"kind": "in-process", **measure_in_process(device, args.requests, args.warmup, images)})
    except ServerError as exc:
        print(f"lumireg bench service: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ImportError as exc:
        print(f"lumireg bench service: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    except Exception as exc:
        print(f"lumireg bench service: the service benchmark failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    report = _report(rows, args, name, what)
    _write(report, out_dir)
    _print(report)
    return EXIT_OK


def _report(rows: list[dict], args, device: str, what: str) -> dict:
    shm_b1 = next(r for r in rows if r["kind"] == "batch" and r["batch"] == 1)
    local = next(r for r in rows if r["kind"] == "in-process")
    return {
        **header("service", device),
        "target": what,
        "settings": {"requests": args.requests, "warmup": args.warmup, "pair": "held-out synthetic, 160x224x192 uint8"},
        "service_over_in_process_p50": shm_b1["p50_ms"] / local["p50_ms"],
        "runs": rows,
    }


def _csv_row(row: dict) -> dict:
    server = row.get("server") or {}
    flat = {**row, **{f"server_{k}": v for k, v in server.items() if k.endswith("_ms")}}
    return {k: flat.get(k) for k in CSV_FIELDS}


def _write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "service.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out_dir / "service.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(_csv_row(r) for r in report["runs"])
    _plot(report, out_dir / "service.png")


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    batch = [r for r in runs if r["kind"] == "batch"]
    for q in ("p50", "p90", "p99"):
        ax1.plot([r["batch"] for r in batch], [r[f"{q}_ms"] / r["batch"] for r in batch], "o-", label=q)
    ax1.set(xlabel="batch size (pairs per request)", ylabel="latency per pair (ms)", title="latency vs batch size")
    ax1.legend()
    conc = [r for r in runs if r["kind"] == "concurrency"]
    ax2.plot([r["concurrency"] for r in conc], [r["pairs_per_s"] for r in conc], "o-", label="measured")
    if conc:
        ideal = conc[0]["pairs_per_s"]
        ax2.plot(
            [r["concurrency"] for r in conc],
            [ideal * r["concurrency"] for r in conc],
            "--",
            c="grey",
            label="linear from C=1",
        )
    ax2.set(xlabel="client concurrency (batch 1)", ylabel="pairs / s", title="throughput vs concurrency")
    for axis, values in ((ax1, [r["batch"] for r in batch]), (ax2, [r["concurrency"] for r in conc])):
        axis.set_xscale("log", base=2)
        axis.set_xticks(values, [str(v) for v in values])
        axis.minorticks_off()
    ax2.legend()
    variants = [r for r in runs if r["kind"] in ("variant", "in-process")]
    short = {"displacement_fp16": "fp16", "displacement": "fp32", "warped": "warped", "qc": "QC"}
    labels = [f"{r['transport']}\n" + "+".join(short[o] for o in r["outputs"].split("+")) for r in variants]
    bottom = np.zeros(len(variants))
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        values = np.array([(r["server"] or {}).get(f"{stage}_ms", 0.0) for r in variants])
        ax3.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    client = np.array([r["p50_ms"] for r in variants]) - bottom
    ax3.bar(
        labels,
        np.where(np.array([r["server"] is None for r in variants]), 0, np.maximum(client, 0)),
        bottom=bottom,
        label="client + wire (p50 - server)",
    )
    local = np.array([r["p50_ms"] if r["server"] is None else 0 for r in variants])
    ax3.bar(labels, local, label="in-process (no server)")
    ax3.set(ylabel="ms per request (batch 1)", title="where the time goes")
    ax3.tick_params(axis="x", labelsize=7)
    ax3.legend(fontsize=7)
    fig.suptitle(f"lumireg service, {report['device']} ({report['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(report: dict) -> None:
    print(
        f"\n{'kind':<12}{'transport':<11}{'outputs':<34}{'B':>3}{'C':>3}{'p50 ms':>10}{'p90 ms':>10}"
        f"{'p99 ms':>10}{'pairs/s':>9}{'MB in/out':>12}{'server infer ms':>17}"
    )
    for r in report["runs"]:
        server = r["server"]["compute_infer_ms"] if r["server"] else float("nan")
        print(
            f"{r['kind']:<12}{r['transport']:<11}{r['outputs']:<34}{r['batch']:>3}{r['concurrency']:>3}"
            f"{r['p50_ms']:>10.1f}{r['p90_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['pairs_per_s']:>9.2f}"
            f"{r['bytes_in_per_pair'] / 1e6:>6.1f}/{r['bytes_out_per_pair'] / 1e6:<5.1f}{server:>17.1f}"
        )
    print(f"service / in-process (p50, batch 1, shared memory): {report['service_over_in_process_p50']:.2f}x")
