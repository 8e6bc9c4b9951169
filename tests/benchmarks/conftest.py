"""Each ``lumireg bench`` subcommand run once per session at tiny settings, through the command line.

The tests of one benchmark read its run; ``test_result_header.py`` reads them all.
"""

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from lumireg.cli import main


@dataclass(frozen=True)
class BenchRun:
    code: int  # the exit code
    folder: Path  # <out>/<device>/, where the results went
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """``bench(*argv)``: run ``lumireg bench *argv --out <fresh folder>`` (once per argv) -> :class:`BenchRun`."""
    runs = {}

    def run(*argv: str) -> BenchRun:
        if argv not in runs:
            out = tmp_path_factory.mktemp(f"bench-{argv[0]}")
            stdout, stderr = io.StringIO(), io.StringIO()
            with redirect_stdout(stdout), redirect_stderr(stderr):
                code = main(["bench", *argv, "--out", str(out)])
            folders = [p for p in out.iterdir() if p.is_dir()]
            runs[argv] = BenchRun(code, folders[0] if len(folders) == 1 else out, stdout.getvalue(), stderr.getvalue())
        return runs[argv]

    return run


@pytest.fixture(scope="session")
def service_run(bench, server) -> BenchRun:
    """The service sweep against the test server: batch 1, 2; concurrency 1, 2; one request per run."""
    return bench(
        "service",
        "--url",
        server.grpc_url,
        "--metrics-url",
        server.metrics_url,
        "--batch-sizes",
        "1,2",
        "--concurrency",
        "1,2",
        "--requests",
        "1",
        "--warmup",
        "0",
    )


@pytest.fixture(scope="session")
def load_run(bench, server) -> BenchRun:
    """Three seconds at one request a second against the test server."""
    return bench(
        "load", "--url", server.grpc_url, "--metrics-url", server.metrics_url, "--rate", "1", "--duration", "3"
    )


@pytest.fixture(scope="session")
def kernels_run(bench) -> BenchRun:
    """Every op on a 6 x 7 x 8 volume at batch 1 and 2, one timed call each, on the CPU."""
    return bench(
        "kernels", "--device", "cpu", "--shape", "6,7,8", "--batch-sizes", "1,2", "--warmup", "0", "--repeats", "1"
    )


@pytest.fixture(scope="session")
def accuracy_run(bench, tmp_path_factory) -> BenchRun:
    """Every method (SyN included) on two 48 x 64 x 48 held-out pairs of every set, lumireg with untrained
    weights, refinement 3 steps."""
    from lumireg.network import LumiNet, save_checkpoint

    checkpoint = save_checkpoint(tmp_path_factory.mktemp("weights") / "untrained.pt", LumiNet())
    return bench(
        "accuracy", "--pairs", "2", "--shape", "48,64,48", "--checkpoint", str(checkpoint), "--refine-steps", "3"
    )


@pytest.fixture(scope="session")
def refine_run(bench) -> BenchRun:
    """One and three refinement steps on a 32 x 48 x 32 pair, both similarities, on the CPU."""
    return bench("refine", "--shape", "32,48,32", "--steps", "1,3")
