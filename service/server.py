"""Start and stop the embedded NVIDIA Triton Inference Server on a model repository (``lumireg serve``).

The ``tritonserver`` binary and its python backend ship inside the PyPI wheel
``nvidia-pytriton``; no Docker, runs on a CPU-only host as on a GPU host. What
it needs, and what :class:`EmbeddedServer` sets up:

- the python backend stub built for this interpreter, copied from
  ``pytriton/tritonserver/python_backend_stubs/<X.Y>/`` next to the backend
  (``backends/python/``), once;
- this environment's ``bin`` first on ``PATH``, so the stub runs this
  environment's Python (and finds lumireg, torch and onnxruntime);
- the wheel's bundled libraries (``nvidia_pytriton.libs``) on ``LD_LIBRARY_PATH``;
- glibc's allocator told (:data:`ALLOCATOR`, unless the caller's environment says otherwise) to give every block
  of 4 MiB or more its own mapping, returned to the system when freed: a request's volumes are tens of MB,
  and glibc's default raises that threshold to the largest block freed so far, after which such blocks come from
  heaps that fragment and keep growing (a soak showed the server's memory climb 8 to 14 % over 10 to 20 minutes).
  Those mappings are asked for as transparent huge pages (``glibc.malloc.hugetlb=1``, where the kernel's
  ``transparent_hugepage`` is ``madvise`` or ``always``): a fresh mapping faults once per 4 KiB page otherwise.
  Blocks under 4 MiB stay in the heap: mapped one by one (the threshold was 128 KiB) they cost the alignment's
  hundreds of small steps 1.39 s a pair against 0.62 s, and the default request's work around the network
  0.85 s against 0.73 s (in process, glibc's defaults); with these settings 0.63 s and 0.71-0.83 s.

The server listens on ``host`` (127.0.0.1 by default) for gRPC; HTTP (KServe v2,
with ``/v2/health/live`` and ``/v2/health/ready``) and Prometheus metrics
(``/metrics``) follow ``host`` when it is loopback and stay on 127.0.0.1
otherwise, unless ``http_host`` / ``metrics_host`` say where.

Security (:class:`Security`): TLS or mutual TLS on gRPC; an access key that
every call but health must carry (Triton's restricted protocols, gRPC and
HTTP); beyond loopback the shared-memory API answers only callers that can
read a local secret file (:func:`lumireg.contract.shared_memory_secret_path`),
so a remote caller cannot map this host's ``/dev/shm``. Models are loaded at
start and never over the network (``--model-control-mode=none``).

The python backend runs each model instance in a stub process of the server's
process group. tritonserver 2.51 never restarts a stub that died (it answers
INTERNAL "Stub process '<instance>' is not healthy." to every later request):
:meth:`EmbeddedServer.dead_stubs` tells, :meth:`EmbeddedServer.restart` starts
the server again on the same ports, and ``lumireg serve`` does both.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
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

from lumireg.contract import (
    ACCESS_KEY_HEADER,
    EXIT_FAILURE,
    EXIT_MISSING_DEPENDENCY,
    EXIT_USAGE,
    GRPC_PORT,
    HEALTH_LIVE_PATH,
    HEALTH_READY_PATH,
    HTTP_PORT,
    METRICS_PATH,
    METRICS_PORT,
    MIN_PING_INTERVAL_MS,
    RESTRICTED_PROTOCOLS,
    SHARED_MEMORY_HEADER,
    check_access_key,
    shared_memory_secret_path,
)


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
    grpc: int = GRPC_PORT
    http: int = HTTP_PORT
    metrics: int = METRICS_PORT


LOOPBACK_HOST = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): nothing beyond this host can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Security:
    """How the server is protected (every field optional; the default is today's open loopback server).

    Attributes:
        tls_cert, tls_key: PEM server certificate and its private key: gRPC over TLS.
        tls_ca: PEM root certificate(s) the clients' certificates must chain to: mutual TLS (needs the two above).
        access_key_file: a file holding the access key every gRPC / HTTP call but health must carry
            (header :data:`~lumireg.contract.ACCESS_KEY_HEADER`); the key is read at start, never logged.
        remote_shared_memory: beyond loopback, leave the shared-memory API open to any caller (with the key, if
            one is set) instead of only to callers that can read the local secret file.
    """

    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_ca: str | Path | None = None
    access_key_file: str | Path | None = None
    remote_shared_memory: bool = False

    def check(self) -> None:
        """``ServerError`` (usage) naming the option and file that is missing, unreadable or inconsistent."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ServerError("TLS needs both --tls-cert and --tls-key")
        if self.tls_ca and not self.tls_cert:
            raise ServerError("mutual TLS (--tls-ca) needs the server's own --tls-cert and --tls-key")
        for option, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-ca", self.tls_ca),
            ("--access-key-file", self.access_key_file),
        ):
            if path and not os.access(path, os.R_OK):
                raise ServerError(f"{option}: cannot read {path}")

    def access_key(self) -> str | None:
        """The access key from :attr:`access_key_file` (checked by :func:`lumireg.contract.check_access_key`)."""
        if not self.access_key_file:
            return None
        try:
            return check_access_key(Path(self.access_key_file).read_text(), f"--access-key-file {self.access_key_file}")
        except (OSError, UnicodeDecodeError) as exc:
            raise ServerError(
                f"--access-key-file: cannot read {self.access_key_file} ({exc.__class__.__name__})"
            ) from None
        except ValueError as exc:
            raise ServerError(str(exc)) from None


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


# glibc malloc tunables for tritonserver and its stubs: a fixed mmap threshold (a fixed value also turns off its
# dynamic raising) and a bounded number of arenas for the server's many threads
ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * 1024 * 1024),
    "MALLOC_ARENA_MAX": "2",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}
# gRPC request/response objects tritonserver keeps for reuse (its default: 8). Each keeps the capacity of the
# largest messages it carried (a LUMIR pair in, a float16 field out: about 52 MiB), so the default pool filled up
# to 8 x 52 MiB as requests now and then overlapped, and even one kept object came and went with the overlaps;
# none kept, each request's buffers are freed when it ends (allocating them again costs milliseconds of a
# seconds-long request)
GRPC_REUSED_REQUESTS = 0


def server_environment(home: Path) -> dict[str, str]:
    """The environment ``tritonserver`` and its python stubs need (see the module docstring)."""
    env = ALLOCATOR | dict(os.environ)
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


def python_stubs(pgid: int) -> dict[int, tuple[str, str]]:
    """The live python-backend stubs of process group ``pgid`` (a tritonserver's): ``{pid: (model instance,
    shared-memory region)}``, from their command lines; a stub that died (a zombie: no command line) is left out."""
    stubs = {}
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit() or os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        # stub model.py region default-size growth-size parent-pid library ipc-handle instance runtime
        if argv[0].endswith("triton_python_backend_stub") and len(argv) > 8:
            stubs[int(entry)] = (argv[8], argv[2])
    return stubs


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
        security: TLS, access key, shared-memory policy (:class:`Security`).
        http_host, metrics_host: where HTTP and metrics listen; None: ``host`` when it is loopback, else 127.0.0.1.
        tritonserver: a Triton installation to run instead of the nvidia-pytriton wheel's (``bin/tritonserver``
            and ``backends/``: ``/opt/tritonserver`` in NVIDIA's container, which has the onnxruntime and
            TensorRT backends too); None: the wheel's.
        extra_args: more tritonserver flags, after lumireg's (``--cuda-memory-pool-byte-size=0:2147483648``).
    """

    def __init__(
        self,
        repository: str | Path,
        host: str = "127.0.0.1",
        ports: Ports = Ports(),
        log: str | Path | None = None,
        verbose: int = 0,
        security: Security = Security(),
        http_host: str | None = None,
        metrics_host: str | None = None,
        tritonserver: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.tritonserver, self.extra_args = tritonserver, tuple(extra_args)
        self.repository = Path(repository).resolve()
        self.host, self.ports, self.log, self.verbose = host, ports, log, verbose
        self.security = security
        local = host if is_loopback(host) else LOOPBACK_HOST
        self.http_host, self.metrics_host = http_host or local, metrics_host or local
        self.process: subprocess.Popen | None = None
        self._secret_file: Path | None = None
        self._stubs: dict[int, tuple[str, str]] = {}  # python_stubs() once ready

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_host}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_host}:{self.ports.metrics}{METRICS_PATH}"

    def command(self, home: Path) -> list[str]:
        # the wheel needs the stub for this Python put in place; a full Triton installation has its backends ready
        backends = backend_directory(home) if (home / "python_backend_stubs").is_dir() else home / "backends"
        return [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            # models load at start and never over the API: no caller can load, unload or swap a model
            "--model-control-mode=none",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-address={self.http_host}",
            f"--http-port={self.ports.http}",
            f"--metrics-address={self.metrics_host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",  # the wheel's build has no DCGM
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            # the clients' keepalive pings during a long request are welcome (Triton's default would GOAWAY them)
            f"--grpc-http2-min-recv-ping-interval-without-data={MIN_PING_INTERVAL_MS}",
            f"--grpc-infer-allocation-pool-size={GRPC_REUSED_REQUESTS}",
            f"--log-verbose={self.verbose}",
            *self._security_flags(),
            *self.extra_args,
        ]

    def _security_flags(self) -> list[str]:
        """tritonserver's TLS and restricted-protocol flags (the key is only ever in the child's arguments)."""
        sec, flags = self.security, []
        if sec.tls_ca:
            flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(sec.tls_ca).resolve()}"]
        elif sec.tls_cert:
            flags.append("--grpc-use-ssl=true")
        if sec.tls_cert:
            flags += [
                f"--grpc-server-cert={Path(sec.tls_cert).resolve()}",
                f"--grpc-server-key={Path(sec.tls_key).resolve()}",
            ]
        protocols = list(RESTRICTED_PROTOCOLS)
        if self._secret_file is not None:
            protocols.remove("shared-memory")
            secret = self._secret_file.read_text()
            flags += [
                f"--grpc-restricted-protocol=shared-memory:{SHARED_MEMORY_HEADER}={secret}",
                f"--http-restricted-api=shared-memory:{SHARED_MEMORY_HEADER}={secret}",
            ]
        key = sec.access_key()
        if key is not None:
            flags += [
                f"--grpc-restricted-protocol={','.join(protocols)}:{ACCESS_KEY_HEADER}={key}",
                f"--http-restricted-api={','.join(protocols)}:{ACCESS_KEY_HEADER}={key}",
            ]
        return flags

    def _write_shared_memory_secret(self) -> None:
        """Beyond loopback (and unless allowed): a fresh secret in a 0600 file only local callers can read."""
        if is_loopback(self.host) or self.security.remote_shared_memory or self._secret_file is not None:
            return  # a restart keeps the secret its clients have read
        path = Path(shared_memory_secret_path(self.ports.grpc))
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
        self._secret_file = path

    def _remove_shared_memory_secret(self) -> None:
        if self._secret_file is not None:
            self._secret_file.unlink(missing_ok=True)
            self._secret_file = None

    def _home(self) -> Path:
        """The Triton installation to run: :attr:`tritonserver`, or the nvidia-pytriton wheel's."""
        if self.tritonserver is None:
            return tritonserver_home()
        home = Path(self.tritonserver)
        if not (home / "bin" / "tritonserver").is_file() or not (home / "backends").is_dir():
            raise ServerMissing(f"--tritonserver {home}: no bin/tritonserver and backends/ there")
        return home

    def start(self, timeout: float = 180.0) -> EmbeddedServer:
        """Start the server and wait until every model is ready; :class:`ServerError` if it cannot."""
        if not (self.repository / "lumireg").is_dir():
            raise ServerError(f"{self.repository} is not a lumireg model repository (run `lumireg export`)")
        self.security.check()
        for name, host, port in (
            ("gRPC", self.host, self.ports.grpc),
            ("HTTP", self.http_host, self.ports.http),
            ("metrics", self.metrics_host, self.ports.metrics),
        ):
            if port_in_use(host, port):
                raise ServerError(
                    f"{name} port {port} on {host} is already in use (another server running?); "
                    f"pick another with --{name.lower()}-port"
                )
        home = self._home()
        self._write_shared_memory_secret()
        try:
            command = self.command(home)
        except ServerError:
            self._remove_shared_memory_secret()
            raise
        output = open(self.log, "ab") if self.log else None
        try:
            self.process = subprocess.Popen(
                command,
                env=server_environment(home),
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True,
            )
        except OSError as exc:
            self._remove_shared_memory_secret()
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
                self._remove_shared_memory_secret()
                raise ServerFailed(f"tritonserver exited with code {code} while starting{self._log_hint()}")
            if self.ready() and self._answers(self.metrics_url):  # Triton opens metrics just after health
                self._stubs = python_stubs(self.process.pid)
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

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _health(self, path: str) -> bool:
        return self._answers(f"{self.http_url}{path}")

    def live(self) -> bool:
        return self._health(HEALTH_LIVE_PATH)

    def ready(self) -> bool:
        return self._health(HEALTH_READY_PATH)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.process.wait() if self.process else 0

    def dead_stubs(self) -> list[str]:
        """The model instances (``lumireg_0``) whose python-backend stub has died since the server became ready."""
        alive = python_stubs(self.process.pid) if self.running() else {}
        return sorted(name for pid, (name, _) in self._stubs.items() if pid not in alive)

    def restart(self, timeout: float = 180.0) -> EmbeddedServer:
        """Kill the server and its stubs (SIGKILL to its process group: with a stub dead its requests cannot finish,
        and SIGTERM would wait ``--exit-timeout-secs`` for them) and start it again on the same ports."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
            self._remove_stub_regions()
        return self.start(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to shut down (SIGTERM: it finishes in-flight requests), kill it if it does not."""
        if self.process is None:
            self._remove_shared_memory_secret()
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the server and its python stubs
                self.process.wait()
        self.process = None
        self._remove_shared_memory_secret()
        self._remove_stub_regions()

    def _remove_stub_regions(self) -> None:
        """Unlink the stubs' regions in /dev/shm that a killed server (or a dead stub) left behind (about 100 MB)."""
        for _, region in self._stubs.values():
            Path("/dev/shm", region).unlink(missing_ok=True)
        self._stubs = {}

    def __enter__(self) -> EmbeddedServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
