"""``lumireg serve``: the bundled (or an exported) model on the embedded Triton server, until Ctrl-C / SIGTERM,
restarted on the same ports when a model's python-backend stub dies (:func:`supervise`)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from lumireg.contract import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK
from lumireg.export import repository
from lumireg.service.server import EmbeddedServer, Ports, Security, ServerError, is_loopback


class _Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C, but is the normal way to stop a server (exit code EXIT_OK)."""


def _stop_on_sigterm(signum, frame):
    raise _Terminated


def ensure_exported(root, log=print) -> None:
    """Export the bundled weights into ``root`` if its network file is missing (a fresh clone's first serve)."""
    if not repository.network_path(root).is_file():
        from lumireg.export.runner import export

        log(f"{repository.network_path(root)} is missing: exporting the bundled weights first")
        export(root=root, log=log)


def run(args: argparse.Namespace) -> int:
    """``lumireg serve`` until SIGTERM (``EXIT_OK``) or Ctrl-C (``EXIT_INTERRUPTED``). When the server cannot
    start: ``EXIT_USAGE`` (a port in use, not a model repository), ``EXIT_MISSING_DEPENDENCY`` (no
    tritonserver here), ``EXIT_FAILURE`` (it died or never became ready); ``EXIT_FAILURE`` too when it exits by
    itself. The message says which. Exit codes of :mod:`lumireg.contract`."""
    ports = Ports(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port)
    security = Security(
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        tls_ca=getattr(args, "tls_ca", None),
        access_key_file=getattr(args, "access_key_file", None),
        remote_shared_memory=getattr(args, "remote_shared_memory", False),
    )
    server = EmbeddedServer(
        args.repository,
        host=args.host,
        ports=ports,
        verbose=args.log_verbose,
        security=security,
        http_host=getattr(args, "http_host", None),
        metrics_host=getattr(args, "metrics_host", None),
        tritonserver=getattr(args, "tritonserver", None),
        extra_args=tuple(getattr(args, "triton_arg", None) or ()),
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # Ctrl-C stops the server even when it was started with SIGINT ignored (a shell's background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ensure_exported(args.repository)
        server.start(timeout=args.timeout)
        print(
            f"lumireg is serving model 'lumireg' on grpc{'s' if security.tls_cert else ''}://{server.grpc_url} "
            f"(HTTP {server.http_url}, metrics {server.metrics_url}); {_protection(server)}; Ctrl-C stops it",
            flush=True,
        )
        if not is_loopback(args.host) and not (security.tls_cert and security.access_key_file):
            print(
                f"lumireg serve: warning: listening on {args.host} without "
                + " and ".join(
                    w for w, on in (("TLS", security.tls_cert), ("an access key", security.access_key_file)) if not on
                )
                + ": images and keys cross the network readable by anyone on it (see README, Deploying in a hospital)",
                file=sys.stderr,
                flush=True,
            )
        code = supervise(server, args.timeout)
        print(f"lumireg serve: tritonserver exited with code {code}", file=sys.stderr)
        return EXIT_FAILURE
    except ServerError as exc:
        print(f"lumireg serve: {exc}", file=sys.stderr)
        return exc.exit_code
    except _Terminated:
        print("lumireg serve: stopping", file=sys.stderr, flush=True)
        return EXIT_OK
    except KeyboardInterrupt:
        print("lumireg serve: interrupted, stopping", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        server.stop()


def supervise(server: EmbeddedServer, timeout: float = 180.0, every: float = 1.0) -> int:
    """Wait for tritonserver to exit and return its exit code; meanwhile, every ``every`` seconds, check the
    python-backend stubs of its models, and when one has died (tritonserver 2.51 never restarts it and answers
    INTERNAL meanwhile) say so in one line and restart tritonserver on the same ports, waiting up to ``timeout``
    seconds for it to be ready (:class:`ServerError` if it is not)."""
    while True:
        try:
            return server.process.wait(every)
        except subprocess.TimeoutExpired:
            pass
        dead = server.dead_stubs()
        if dead:
            start = time.monotonic()
            print(
                f"lumireg serve: the python backend process of model instance {', '.join(dead)} died: "
                f"restarting tritonserver on the same ports",
                file=sys.stderr,
                flush=True,
            )
            server.restart(timeout)
            print(f"lumireg serve: ready again after {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def _protection(server: EmbeddedServer) -> str:
    """One phrase: what protects the endpoint (never the key itself)."""
    sec = server.security
    tls = "mutual TLS" if sec.tls_ca else "TLS" if sec.tls_cert else "no TLS"
    key = "access key required" if sec.access_key_file else "no access key"
    shm = "shared memory local only" if server._secret_file is not None else "shared memory open"
    return f"{tls}, {key}, {shm}"


def add_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="start the Triton Inference Server on the bundled model",
        description="Serve lumireg on the embedded NVIDIA Triton Inference Server (CPU or GPU).",
    )
    serve.add_argument(
        "--repository",
        default=str(repository.SOURCE_REPOSITORY),
        help="model repository (default: the project's model_repository/, exported on first use)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--grpc-port", type=int, default=Ports.grpc, help=f"gRPC port (default: {Ports.grpc})")
    serve.add_argument("--http-port", type=int, default=Ports.http, help=f"HTTP port (default: {Ports.http})")
    serve.add_argument(
        "--metrics-port", type=int, default=Ports.metrics, help=f"Prometheus metrics port (default: {Ports.metrics})"
    )
    serve.add_argument("--http-host", help="address for HTTP (default: --host when it is loopback, else 127.0.0.1)")
    serve.add_argument(
        "--metrics-host", help="address for metrics (default: --host when it is loopback, else 127.0.0.1)"
    )
    serve.add_argument("--tls-cert", help="PEM server certificate: gRPC over TLS (with --tls-key)")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-ca", help="PEM CA certificate(s) client certificates must chain to: mutual TLS")
    serve.add_argument(
        "--access-key-file",
        help="file holding the access key every call but health must carry (16..512 characters; "
        "`openssl rand -hex 32 > FILE`); never logged",
    )
    serve.add_argument(
        "--remote-shared-memory",
        action="store_true",
        help="beyond loopback, let remote callers use the shared-memory API too (default: local callers only)",
    )
    serve.add_argument(
        "--tritonserver",
        help="a Triton installation (bin/tritonserver, backends/) to run instead of nvidia-pytriton's, e.g. "
        "/opt/tritonserver in NVIDIA's tritonserver image (onnxruntime and TensorRT backends)",
    )
    serve.add_argument(
        "--triton-arg",
        action="append",
        metavar="FLAG",
        help="one more tritonserver flag, after lumireg's (repeatable), e.g. "
        "--triton-arg=--cuda-memory-pool-byte-size=0:2147483648",
    )
    serve.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server to be ready")
    serve.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level (default: 0)")
    serve.set_defaults(func=run)
