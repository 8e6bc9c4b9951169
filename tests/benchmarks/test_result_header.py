"""Every benchmark's result JSON starts with the same header: benchmark, device, CPU, versions, commit, date."""

import datetime
import json

import pytest

from lumireg.benchmarks.machine import HEADER_KEYS, VERSIONED, cpu_model, header
from lumireg.contract import EXIT_OK


@pytest.mark.parametrize("benchmark", ["service", "load", "kernels", "accuracy", "refine"])
def test_every_result_file_carries_the_common_header(benchmark, request):
    run = request.getfixturevalue(f"{benchmark}_run")
    assert run.code == EXIT_OK, run.stderr
    files = sorted(run.folder.glob("*.json"))
    assert files, f"{benchmark} wrote no JSON"
    for path in files:  # accuracy: accuracy.json and one accuracy-<method>.json per method
        report = json.loads(path.read_text())
        assert list(report)[: len(HEADER_KEYS)] == list(HEADER_KEYS), path.name
        assert report["benchmark"] == benchmark
        assert report["device"] == "cpu " + cpu_model() or not report["device"].startswith("cpu")
        assert report["cpu"] == cpu_model()
        assert set(report["versions"]) == {"python", "cuda", *VERSIONED} and report["versions"]["lumireg"]
        age = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(report["date"])
        assert datetime.timedelta(0) <= age < datetime.timedelta(hours=1)
        assert report["commit"] == header(benchmark)["commit"]


def test_header_names_the_checkout_and_the_device():
    head = header("kernels", "NVIDIA H200")
    assert tuple(head) == HEADER_KEYS and head["device"] == "NVIDIA H200"
    assert head["commit"] is None or len(head["commit"]) == 40
    assert head["versions"]["python"].count(".") == 2
