"""benchmarks/gpu_suite.sh where no GPU is: the pre-flight refuses in seconds, naming what is missing; steps are
checked before anything runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.sh"


def _suite(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": sys.executable, "RESULTS": str(tmp_path)}
    return subprocess.run(["bash", str(SUITE), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_preflight_without_a_gpu_fails_naming_the_missing_gpu(tmp_path):
    done = _suite(tmp_path, "preflight")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "MISSING a GPU visible to torch" in done.stdout and "no GPU" in done.stderr
    assert "--rehearse" in done.stdout  # what to do instead on such a host
    (log,) = tmp_path.glob("*/gpu-suite/preflight.log")
    assert "Python headers for Triton's JIT" in log.read_text()
    assert (log.parent / "steps.csv").read_text().startswith("preflight,1,")


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path):
    done = _suite(tmp_path, "kernels", "kernel")
    assert done.returncode == 2
    assert "unknown step 'kernel'" in done.stderr and "preflight kernels pipeline serve" in done.stderr
    assert not list(tmp_path.iterdir())
