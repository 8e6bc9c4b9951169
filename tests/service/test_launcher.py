"""`lumireg serve` and the launcher: clear failures, clean stops."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from lumireg.contract import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_USAGE
from lumireg.export.repository import SOURCE_REPOSITORY
from lumireg.service.server import EmbeddedServer, ServerError, free_ports, port_in_use


def test_a_taken_port_is_named(tmp_path):
    ports = free_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.grpc))
        taken.listen()
        with pytest.raises(ServerError, match=f"gRPC port {ports.grpc} on 127.0.0.1 is already in use"):
            EmbeddedServer(SOURCE_REPOSITORY, ports=ports).start()


def test_a_folder_that_is_not_a_repository_is_refused(tmp_path):
    with pytest.raises(ServerError, match="not a lumireg model repository") as error:
        EmbeddedServer(tmp_path, ports=free_ports()).start()
    assert error.value.exit_code == EXIT_USAGE


def test_a_broken_repository_reports_the_server_log(tmp_path):
    (tmp_path / "lumireg").mkdir()
    (tmp_path / "lumireg" / "config.pbtxt").write_text("this is not a model config")
    with pytest.raises(ServerError, match="tritonserver exited with code") as error:
        EmbeddedServer(tmp_path, ports=free_ports(), log=tmp_path / "log.txt").start(timeout=120)
    assert "failed to read text proto" in str(error.value).split("its errors")[1]
    assert error.value.exit_code == EXIT_FAILURE  # it ran and died: not the caller's usage


def test_serve_without_nvidia_pytriton_exits_with_missing_dependency(tmp_path, monkeypatch, capsys):
    import argparse

    from lumireg.service import runner, server

    monkeypatch.setattr(server, "find_spec", lambda name: None)
    monkeypatch.setattr(runner, "ensure_exported", lambda root: None)
    monkeypatch.setattr(runner.signal, "signal", lambda *_: None)  # this test process keeps its own SIGTERM
    ports = free_ports()
    args = argparse.Namespace(
        repository=str(SOURCE_REPOSITORY),
        host="127.0.0.1",
        grpc_port=ports.grpc,
        http_port=ports.http,
        metrics_port=ports.metrics,
        timeout=5.0,
        log_verbose=0,
    )
    assert runner.run(args) == EXIT_MISSING_DEPENDENCY
    assert "nvidia-pytriton" in capsys.readouterr().err


@pytest.mark.parametrize(
    "stop,code", [(signal.SIGTERM, EXIT_OK), (signal.SIGINT, EXIT_INTERRUPTED)], ids=["sigterm", "ctrl-c"]
)
def test_serve_prints_its_endpoint_and_stops_cleanly(server, stop, code):
    ports = free_ports()
    command = [
        sys.executable,
        "-m",
        "lumireg",
        "serve",
        "--grpc-port",
        str(ports.grpc),
        "--http-port",
        str(ports.http),
        "--metrics-port",
        str(ports.metrics),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 180
        line = ""
        while time.monotonic() < deadline and "serving" not in line:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
        assert f"grpc://127.0.0.1:{ports.grpc}" in line, line
        assert port_in_use("127.0.0.1", ports.grpc)
        process.send_signal(stop)
        # the server is given 30 s to finish in-flight work, then killed; a loaded CPU adds the stubs' exit
        assert process.wait(120) == code
        assert not any(port_in_use("127.0.0.1", port) for port in (ports.grpc, ports.http, ports.metrics))
    finally:
        if process.poll() is None:
            process.kill()


def test_another_triton_installation_runs_with_its_own_backends_and_extra_flags(tmp_path):
    from lumireg.service.server import ServerMissing, tritonserver_home

    with pytest.raises(ServerMissing, match="no bin/tritonserver and backends/"):
        EmbeddedServer(SOURCE_REPOSITORY, ports=free_ports(), tritonserver=tmp_path).start()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tritonserver").symlink_to(tritonserver_home() / "bin" / "tritonserver")
    (tmp_path / "backends").mkdir()  # as in NVIDIA's image: no python_backend_stubs/ to install from
    pool = "--cuda-memory-pool-byte-size=0:2147483648"
    server = EmbeddedServer(SOURCE_REPOSITORY, tritonserver=tmp_path, extra_args=(pool,))
    command = server.command(server._home())
    assert command[0] == str(tmp_path / "bin" / "tritonserver")
    assert f"--backend-directory={tmp_path / 'backends'}" in command and command[-1] == pool
