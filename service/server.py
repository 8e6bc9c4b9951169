"""Start and stop the embedded NVIDIA Triton Inference Server on a model repository (``lumireg serve``).

The ``tritonserver`` binary and its python backend ship inside the PyPI wheel
``nvidia-pytriton``; no Docker, runs on a CPU-only host as on a GPU host. What
it needs, and what :class:`EmbeddedServer` sets up:

- the python backend stub built for this interpreter, copied from
  ``pytriton/tritonserver/python_backend_stubs/<X.Y>/`` next to the backend
  (``backends/python/``), once;
- this environment's ``bin`` first on ``PATH``, so the stub runs this
  environment's Python (and finds lumireg, torch and onnxruntime);
- the wheel's bundled libraries (``nvidia_pytriton.libs``) on ``LD_LIBRARY_PATH``.

The server listens on ``host`` (127.0.0.1 by default): gRPC, HTTP (KServe v2,
with ``/v2/health/live`` and ``/v2/health/ready``) and Prometheus metrics
(``/metrics``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from lumireg.contract import EXIT_FAILURE, EXIT_MISSING_DEPENDENCY, EXIT_USAGE


class ServerError(RuntimeError):
    """The server could not start (or stopped); the message says why. ``exit_code``: the contract's code for it."""

    exit_code = EXIT_USAGE  # a port in use, not a model repository: the caller's to fix


class ServerMissing(ServerError):
    """No usable tritonserver here (nvidia-pytriton absent, or without a binary or a stub for this Python)."""

    exit_code = EXIT_MISSING_DEPENDENCY


class ServerFailed(ServerError):
    """tritonserver ran but died or never became ready; its log says why."""

    exit_code = EXIT_FAILURE


@dataclass(frozen=True)
class Ports:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002


def tritonserver_home() -> Path:
    """The ``pytriton/tritonserver`` folder of the installed nvidia-pytriton wheel."""
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerMissing("the embedded Triton server needs the nvidia-pytriton wheel: pip install 'lumireg[server]'")
    home = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise ServerMissing(f"no tritonserver binary in {home / 'bin'}; reinstall nvidia-pytriton")
    return home


def backend_directory(home: Path) -> Path:
    """``backends/`` with the python backend stub for this Python version in place."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = home / "backends" / "python" / stub.name
    if not stub.is_file():
        available = sorted(p.name for p in (home / "python_backend_stubs").iterdir())
        raise ServerMissing(f"nvidia-pytriton has no python backend stub for Python {version} (it has {available})")
    if not target.is_file() or target.stat().st_size != stub.stat().st_size:
        try:
            shutil.copy2(stub, target)
        except OSError as exc:
            raise ServerError(f"cannot install the python backend stub into {target.parent}: {exc}") from exc
    return home / "backends"


def server_environment(home: Path) -> dict[str, str]:
    """The environment ``tritonserver`` and its python stubs need (see the module docstring)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libraries = home.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(libraries), env.get("LD_LIBRARY_PATH", "")] if p)
    return env


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(host: str = "127.0.0.1") -> Ports:
    """Three ports free on ``host`` now (for tests and benchmarks that start their own server)."""
    sockets = [socket.socket() for _ in range(3)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return Ports(*(s.getsockname()[1] for s in sockets))
    finally:
        for s in sockets:
            s.close()


class EmbeddedServer:
    """The embedded ``tritonserver`` as a context manager: started, ready, and stopped on exit.

    Args:
        repository: the model repository (see :mod:`lumireg.export.repository`).
        host: address to listen on.
        ports: gRPC, HTTP and metrics ports.
        log: where the server's output goes: a path, or None for this process's stdout/stderr.
        verbose: tritonserver's ``--log-verbose`` level.
    """

    def __init__(
        self,
        repository: str | Path,
        host: str = "127.0.0.1",
        ports: Ports = Ports(),
        log: str | Path | None = None,
        verbose: int = 0,
    ):
        self.repository = Path(repository).resolve()
        self.host, self.ports, self.log, self.verbose = host, ports, log, verbose
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    def command(self, home: Path) -> list[str]:
        return [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory(home)}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",  # the wheel's build has no DCGM
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.verbose}",
        ]

    def start(self, timeout: float = 180.0) -> EmbeddedServer:
        """Start the server and wait until every model is ready; :class:`ServerError` if it cannot."""
        if not (self.repository / "lumireg").is_dir():
            raise ServerError(f"{self.repository} is not a lumireg model repository (run `lumireg export`)")
        for name, port in (("gRPC", self.ports.grpc), ("HTTP", self.ports.http), ("metrics", self.ports.metrics)):
            if port_in_use(self.host, port):
                raise ServerError(
                    f"{name} port {port} on {self.host} is already in use (another server running?); "
                    f"pick another with --{name.lower()}-port"
                )
        home = tritonserver_home()
        output = open(self.log, "ab") if self.log else None
        try:
            self.process = subprocess.Popen(
                self.command(home),
                env=server_environment(home),
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServerError(f"cannot run {home / 'bin' / 'tritonserver'}: {exc}") from exc
        finally:
            if output:
                output.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise ServerFailed(f"tritonserver exited with code {code} while starting{self._log_hint()}")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerFailed(f"tritonserver was not ready after {timeout:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if not self.log:
            return " (its log is above)"
        lines = Path(self.log).read_text(errors="replace").splitlines()
        # Triton's error lines start with E<date>; the CUDA helper's complaint on CPU-only hosts is noise
        errors = [
            line
            for line in lines
            if (line.startswith("E") and "CudaDriverHelper" not in line) or line.startswith("error:")
        ]
        return f"; its errors ({self.log}):\n" + "\n".join((errors or lines)[-25:])

    def _health(self, kind: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/{kind}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def live(self) -> bool:
        return self._health("live")

    def ready(self) -> bool:
        return self._health("ready")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.process.wait() if self.process else 0

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to shut down (SIGTERM: it finishes in-flight requests), kill it if it does not."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the server and its python stubs
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
