"""`lumireg bench service` on a tiny run against the real embedded server."""

import csv
import json

import numpy as np

from lumireg.cli import main
from lumireg.contract import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from lumireg.service.server import free_ports

PAIR_BYTES = 2 * 160 * 224 * 192  # two uint8 volumes
FIELD_BYTES = {
    "displacement_fp16": 3 * 160 * 224 * 192 * 2,
    "displacement": 3 * 160 * 224 * 192 * 4,
    "warped": 160 * 224 * 192 * 4,
    "qc": 0,
}


def test_tiny_sweep_fills_every_field(service_run):
    assert service_run.code == EXIT_OK, service_run.stderr
    device_dir = service_run.folder
    report = json.loads((device_dir / "service.json").read_text())
    assert report["device"] and report["cpu"] and report["versions"]["lumireg"] and "server at" in report["target"]
    kinds = [(r["kind"], r["transport"], r["batch"], r["concurrency"]) for r in report["runs"]]
    assert kinds[:4] == [
        ("batch", "shm", 1, 1),
        ("batch", "shm", 2, 1),
        ("concurrency", "shm", 1, 1),
        ("concurrency", "shm", 1, 2),
    ]
    assert {r["transport"] for r in report["runs"]} == {"shm", "grpc", "in-process"}
    for run in report["runs"]:
        assert 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"], run
        assert run["pairs"] == run["requests"] * run["batch"] and run["pairs_per_s"] > 0
        if run["kind"] == "in-process":
            assert run["server"] is None
            continue
        assert run["bytes_in_per_pair"] == PAIR_BYTES
        assert run["bytes_out_per_pair"] == sum(FIELD_BYTES[o] for o in run["outputs"].split("+"))
        server = run["server"]  # Triton's counters moved by exactly this run's requests
        assert server["requests"] == run["requests"] and server["executions"] >= 1
        assert 0 < server["compute_infer_ms"] <= server["request_ms"] <= run["p99_ms"] * 1.05
        assert server["lumireg_stages_ms"]["network"] > 0
        assert ("qc" in run["outputs"]) == (server["lumireg_stages_ms"].get("qc", 0) > 0)
    assert np.isfinite(report["service_over_in_process_p50"]) and report["service_over_in_process_p50"] > 0
    with (device_dir / "service.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(report["runs"])
    assert (device_dir / "service.png").stat().st_size > 10_000
    assert "service / in-process" in service_run.stdout


def test_service_benchmark_without_a_server_is_unavailable(tmp_path, capsys):
    url = f"127.0.0.1:{free_ports().grpc}"  # nothing listens there
    assert main(["bench", "service", "--url", url, "--requests", "1", "--out", str(tmp_path)]) == EXIT_UNAVAILABLE
    assert url in capsys.readouterr().err and not list(tmp_path.glob("*/service.json"))


def test_service_benchmark_refuses_bad_options_before_sending(tmp_path, capsys):
    assert (
        main(["bench", "service", "--url", "127.0.0.1:1", "--batch-sizes", "0", "--out", str(tmp_path)]) == EXIT_USAGE
    )
    assert "--batch-sizes needs positive integers" in capsys.readouterr().err
