"""`lumireg bench capacity`: the queueing simulation of N servers against cases whose answer is known, and the
command on a measured service.json."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lumireg.benchmarks.capacity import service_time, simulate, simulate_server
from lumireg.cli import main
from lumireg.contract import EXIT_OK, EXIT_USAGE, MAX_BATCH_SIZE
from lumireg.export.repository import MAX_QUEUE_SIZE, QUEUE_TIMEOUT_US

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results" / "cpu-amd-epyc"
FIXED = {"median_s": 1.0, "sigma": 1e-9, "mean_s": 1.0}  # every request takes 1 s


def test_a_server_faster_than_its_arrivals_answers_each_in_its_service_time():
    latencies, refused = simulate_server(np.arange(10) * 2.0, np.full(10, 1.5))
    assert refused == 0 and latencies == pytest.approx([1.5] * 10)


def test_waiting_requests_are_served_in_batches_that_cost_their_sum():
    # three arrive while the first runs: they go together as one batch of 3, answered at 1 + 3 x 1 s
    latencies, refused = simulate_server(np.array([0.0, 0.1, 0.2, 0.3]), np.ones(4))
    assert refused == 0 and latencies == pytest.approx([1.0, 3.9, 3.8, 3.7])


def test_a_full_queue_and_a_long_wait_refuse_requests():
    burst = np.zeros(1 + MAX_QUEUE_SIZE + 5)  # one runs, MAX_QUEUE_SIZE wait, the rest find the queue full
    latencies, refused = simulate_server(burst, np.ones(len(burst)))
    assert refused == 5 and len(latencies) == 1 + MAX_QUEUE_SIZE
    timeout = QUEUE_TIMEOUT_US / 1e6
    slow = np.array([0.0, 0.5, 0.6])  # the first holds the server past the others' queue timeout
    latencies, refused = simulate_server(slow, np.array([timeout + 1, 1.0, 1.0]))
    assert refused == 2 and latencies == pytest.approx([timeout + 1])
    assert MAX_BATCH_SIZE <= MAX_QUEUE_SIZE  # a full queue fits in one batch, as the cases above assume


def test_n_servers_round_robin_at_n_times_the_rate_behave_like_one():
    rng = np.random.default_rng(0)
    one = simulate(0.8, 1, FIXED, 400, rng, poisson=False)
    four = simulate(3.2, 4, FIXED, 1600, rng, poisson=False)
    for key in ("p50_s", "p99_s", "refused_fraction", "utilisation"):
        assert four[key] == pytest.approx(one[key])
    assert one["p99_s"] == pytest.approx(1.0) and one["utilisation"] == pytest.approx(0.8)


def test_poisson_arrivals_queue_more_as_the_servers_fill_up():
    rng = np.random.default_rng(1)
    p99 = [simulate(rate, 2, FIXED, 4000, rng)["p99_s"] for rate in (0.4, 1.2, 1.8)]
    assert 1.0 <= p99[0] < p99[1] < p99[2]


def test_the_service_time_is_the_lognormal_through_the_runs_p50_and_p90():
    report = {
        "runs": [
            {"transport": "shm"},
            {
                "transport": "grpc",
                "outputs": "displacement_fp16",
                "batch": 1,
                "concurrency": 1,
                "p50_ms": 4000.0,
                "p90_ms": 5000.0,
            },
        ]
    }
    fit = service_time(report)
    assert fit["median_s"] == 4.0
    assert math.exp(math.log(4.0) + 1.2815515655446004 * fit["sigma"]) == pytest.approx(5.0)
    assert fit["batch_exponent"] == 1.0  # one batch size: no batching gain assumed
    report["runs"] += [{"kind": "batch", "concurrency": 1, "batch": b, "p50_ms": 1000.0 * b**0.8} for b in (1, 2, 4, 8)]
    assert service_time(report)["batch_exponent"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no run"):
        service_time({"runs": [{"transport": "shm"}]})


def test_capacity_writes_its_curves_and_the_check_against_the_load_test(tmp_path, capsys):
    shutil.copy(RESULTS / "service.json", tmp_path / "service.json")
    load = {"rate_target_per_s": 0.1, "requests_sent": 12, "latency": {"p50_ms": 5000, "p90_ms": 6000, "p99_ms": 7000}}
    (tmp_path / "load.json").write_text(json.dumps(load))
    argv = ["bench", "capacity", "--device-dir", str(tmp_path), "--replicas", "1,2", "--requests", "300"]
    assert main(argv) == EXIT_OK
    report = json.loads((tmp_path / "capacity.json").read_text())
    assert {r["replicas"] for r in report["curves"]} == {1, 2} and (tmp_path / "capacity.png").is_file()
    (check,) = report["checks"]
    band = check["predicted_ms"]["p50"]["band_5_95"]
    assert check["load_json"] == "load.json" and band[0] <= check["predicted_ms"]["p50"]["median"] <= band[1]
    assert "predicted" in capsys.readouterr().out
    assert main(["bench", "capacity", "--device-dir", str(tmp_path / "none")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "service.json" in err[0]
