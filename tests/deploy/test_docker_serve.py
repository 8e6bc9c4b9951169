"""The image's command (docker-serve.sh): tritonserver's flags and a CUDA memory pool on every GPU CUDA sees."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docker-serve.sh"


def _run(tmp_path, gpus: int, *args, **env) -> list[str]:
    """The tritonserver command line the script execs, with ``gpus`` GPUs in nvidia-smi's list."""
    (tmp_path / "tritonserver").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {k}: H100'\n" for k in range(gpus)))
    for name in ("tritonserver", "nvidia-smi"):
        (tmp_path / name).chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    environment |= {"PATH": f"{tmp_path}:/usr/bin:/bin", **env}
    done = subprocess.run(["sh", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _pools(flags: list[str]) -> list[str]:
    return [f.split("=", 1)[1] for f in flags if f.startswith("--cuda-memory-pool-byte-size=")]


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_every_gpu_gets_its_own_memory_pool(tmp_path, gpus):
    assert _pools(_run(tmp_path, gpus)) == [f"{k}:2147483648" for k in range(gpus)]


def test_cuda_visible_devices_decides_which_gpus_count(tmp_path):
    assert _pools(_run(tmp_path, 8, CUDA_VISIBLE_DEVICES="5,7", LUMIREG_CUDA_POOL_BYTES="1000")) == ["0:1000", "1:1000"]


def test_the_repository_can_move_and_arguments_are_added(tmp_path):
    flags = _run(tmp_path, 1, "--log-verbose=1", LUMIREG_MODELS="/tmp/models")
    assert flags[0] == "--model-repository=/tmp/models" and "--model-control-mode=none" in flags
    assert "--log-verbose=1" in flags
