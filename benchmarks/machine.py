"""What every benchmark records about the machine and the code it measured."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    """A device name as a folder name: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", text.lower())).strip("-")


def git_commit() -> str | None:
    """The checked-out lumireg commit, or None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_version(package: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(cuda: bool | None = None) -> str:
    """What a benchmark ran on: the GPU's name (``cuda``; None: whether torch sees one), else ``"cpu <model>"``."""
    if cuda is None:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
    if cuda:
        import torch

        return torch.cuda.get_device_name()
    return f"cpu {cpu_model()}"


HEADER_KEYS = ("benchmark", "device", "cpu", "versions", "commit", "date")
# the same packages in every result file (None where not installed), whatever the benchmark imports
VERSIONED = ("lumireg", "numpy", "torch", "triton", "onnxruntime", "tritonclient", "nvidia-pytriton", "antspyx")


def header(benchmark: str, device: str | None = None) -> dict:
    """The keys every benchmark's result JSON starts with (:data:`HEADER_KEYS`).

    ``benchmark``: service, load, kernels or accuracy; ``device``: what it ran on
    (default :func:`device_name`); ``cpu``: the CPU's model; ``versions``: Python,
    CUDA (torch's build, None without one) and :data:`VERSIONED`; ``commit``: the
    lumireg commit (None outside a checkout); ``date``: UTC, ISO 8601, seconds.
    """
    try:
        import torch

        cuda = torch.version.cuda
    except ImportError:
        cuda = None
    return {
        "benchmark": benchmark,
        "device": device or device_name(),
        "cpu": cpu_model(),
        "versions": {"python": platform.python_version(), "cuda": cuda, **{p: package_version(p) for p in VERSIONED}},
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def shape_option(text: str | None) -> tuple[int, int, int] | None:
    """A ``--shape D,H,W`` option as a tuple (None when not given); ``ValueError`` unless three multiples of 16."""
    from lumireg.contract import check_size_multiple

    if not text:
        return None
    shape = tuple(int(s) for s in text.split(","))
    if len(shape) != 3:
        raise ValueError(f"--shape needs three sizes D,H,W, got {text!r}")
    check_size_multiple(shape, "--shape")
    return shape
