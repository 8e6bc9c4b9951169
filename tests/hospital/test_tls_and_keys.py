"""TLS, mutual TLS, the access key and the shared-memory lock, on one real embedded server.

The server listens on 0.0.0.0 (beyond loopback) with mutual TLS and an access key, at log verbosity 1; HTTP and
metrics must then be on 127.0.0.1 and the shared-memory API open only to callers holding the local secret.
"""

import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lumireg.cli import main
from lumireg.client import AccessDenied, Credentials, RegistrationClient
from lumireg.client.security import read_access_key
from lumireg.client.transport import SharedMemoryTransport
from lumireg.contract import (
    ACCESS_KEY_ENV,
    ACCESS_KEY_HEADER,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    shared_memory_secret_path,
)
from lumireg.export.repository import SOURCE_REPOSITORY
from lumireg.service.server import EmbeddedServer, Security, ServerError, free_ports


@pytest.fixture(scope="module")
def secure_server(certificates, access_key_file, tmp_path_factory):
    security = Security(
        tls_cert=certificates["server_cert"],
        tls_key=certificates["server_key"],
        tls_ca=certificates["ca"],
        access_key_file=access_key_file,
    )
    log = tmp_path_factory.mktemp("secure") / "server.log"
    with EmbeddedServer(
        SOURCE_REPOSITORY, host="0.0.0.0", ports=free_ports(), log=log, verbose=1, security=security
    ) as running:
        yield running


@pytest.fixture(scope="module")
def url(secure_server) -> str:
    return f"localhost:{secure_server.ports.grpc}"


@pytest.fixture
def tls_args(certificates) -> list[str]:
    return [
        "--tls-ca",
        str(certificates["ca"]),
        "--tls-cert",
        str(certificates["client_cert"]),
        "--tls-key",
        str(certificates["client_key"]),
    ]


def register(url, files, out, *extra) -> int:
    fixed, moving = files
    return main(
        ["register", str(fixed), str(moving), "-o", str(out), "--url", url, "--outputs", "displacement", *extra]
    )


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_http_and_metrics_stay_on_loopback_beyond_it(secure_server):
    assert secure_server.http_host == secure_server.metrics_host == "127.0.0.1"
    with urllib.request.urlopen(f"{secure_server.http_url}/v2/health/ready", timeout=5) as answer:
        assert answer.status == 200  # health stays open for probes
    with pytest.raises(urllib.error.HTTPError) as refused:  # everything else over HTTP needs the key too
        urllib.request.urlopen(f"{secure_server.http_url}/v2/models/lumireg/config", timeout=5)
    assert refused.value.code == 403 and ACCESS_KEY_HEADER in refused.value.read().decode()


def test_a_plaintext_client_is_told_the_server_speaks_tls(url, lumir_pair_files, tmp_path, capsys):
    code = register(url, lumir_pair_files, tmp_path / "out", "--retry-seconds", "0")
    line = one_line(capsys)
    assert code == EXIT_UNAVAILABLE and "speaks TLS" in line and "--tls" in line, line
    assert not (tmp_path / "out").exists()


def test_mutual_tls_refuses_a_client_without_a_certificate(url, certificates, lumir_pair_files, tmp_path, capsys):
    bare = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(certificates["ca"]))
    with pytest.raises(InferenceServerException) as refused:
        bare.is_server_live(client_timeout=10)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    code = register(url, lumir_pair_files, tmp_path / "out", "--tls-ca", str(certificates["ca"]))
    line = one_line(capsys)
    assert code == EXIT_UNAVAILABLE and "client certificate" in line, line


def test_a_server_certificate_from_an_unknown_ca_is_named(url, certificates, lumir_pair_files, tmp_path, capsys):
    code = register(url, lumir_pair_files, tmp_path / "out", "--tls-ca", str(certificates["other_ca"]))
    line = one_line(capsys)
    assert code == EXIT_UNAVAILABLE and "not trusted" in line, line


@pytest.mark.parametrize("given", ["no key", "wrong key"])
def test_a_missing_or_wrong_key_is_refused_without_echoing_any_key(
    given, secure_server, url, tls_args, access_key, lumir_pair_files, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv(ACCESS_KEY_ENV, raising=False)
    wrong = "not-the-key-" + "x" * 20
    extra = []
    if given == "wrong key":
        (tmp_path / "wrong.key").write_text(wrong)
        extra = ["--access-key-file", str(tmp_path / "wrong.key")]
    code = register(url, lumir_pair_files, tmp_path / "out", *tls_args, *extra)
    line = one_line(capsys)
    assert code == EXIT_USAGE, line
    assert ("needs an access key" if given == "no key" else "refused this client's access key") in line, line
    assert access_key not in line and wrong not in line
    assert not (tmp_path / "out").exists()
    assert secure_server.ready()
    # the raw refusal (Triton's own words) names the header, not a key
    with RegistrationClient(url, transport="grpc", credentials=_credentials(tls_args)) as client:
        with pytest.raises(InferenceServerException) as raw:
            client.client.get_server_metadata()
        assert ACCESS_KEY_HEADER in raw.value.message() and access_key not in raw.value.message()
        with pytest.raises(AccessDenied, match="needs an access key"):  # the library says the same
            client.infer({"fixed": np.zeros((1, 1, 160, 224, 192), np.uint8)}, ["displacement"])


def _credentials(tls_args, key=None) -> Credentials:
    options = dict(zip(tls_args[::2], tls_args[1::2]))
    return Credentials(
        tls=True,
        tls_ca=options["--tls-ca"],
        tls_cert=options["--tls-cert"],
        tls_key=options["--tls-key"],
        access_key=key,
    )


def test_the_right_key_registers_over_mutual_tls_end_to_end(
    secure_server, url, tls_args, access_key, access_key_file, lumir_pair_files, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv(ACCESS_KEY_ENV, raising=False)
    out = tmp_path / "out"
    code = register(url, lumir_pair_files, out, *tls_args, "--access-key-file", str(access_key_file))
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert (out / "displacement.nii.gz").is_file()
    # from the environment too, and through gRPC payloads as well as shared memory
    monkeypatch.setenv(ACCESS_KEY_ENV, access_key)
    code = register(url, lumir_pair_files, tmp_path / "env", *tls_args, "--transport", "grpc")
    captured_env = capsys.readouterr()
    assert code == EXIT_OK, captured_env.err
    for text in (captured.out, captured.err, captured_env.out, captured_env.err):
        assert access_key not in text
    for path in [*out.rglob("*"), *(tmp_path / "env").rglob("*")]:
        assert access_key.encode() not in path.read_bytes()
    assert access_key not in repr(_credentials(tls_args, access_key))


def test_shared_memory_beyond_loopback_needs_the_local_secret(secure_server, url, tls_args, access_key):
    secret = Path(shared_memory_secret_path(secure_server.ports.grpc))
    assert secret.is_file() and (secret.stat().st_mode & 0o077) == 0  # readable by the server's user only
    credentials = _credentials(tls_args, access_key)
    with RegistrationClient(url, transport="shm", credentials=credentials) as local:
        assert local.transport.headers  # a client on this host found the secret
        assert local.access_problem() is None
    with RegistrationClient(url, transport="shm", credentials=credentials) as remote:
        remote.transport.close(remote.client)
        remote.transport = SharedMemoryTransport(1)  # what a caller elsewhere has: the key, not the secret
        with pytest.raises(AccessDenied, match="shared memory"):
            remote.infer({"fixed": np.zeros((1, 1, 160, 224, 192), np.uint8)}, ["displacement"])
    assert secure_server.ready()


def test_the_server_log_never_holds_the_key_or_the_image_paths(secure_server, access_key, lumir_pair_files):
    text = Path(secure_server.log).read_text(errors="replace")
    assert "lumireg" in text  # verbose 1: the log has content to check
    assert access_key not in text
    for path in lumir_pair_files:
        assert path.name not in text and str(path.parent) not in text
    secret = Path(shared_memory_secret_path(secure_server.ports.grpc)).read_text()
    assert secret not in text


def test_a_malformed_key_file_is_refused_by_both_sides_without_showing_it(tmp_path):
    bad = tmp_path / "short.key"
    bad.write_text("tooshort")
    with pytest.raises(ValueError, match="16..512") as client_side:
        read_access_key(bad)
    assert "tooshort" not in str(client_side.value)
    with pytest.raises(ServerError, match="16..512") as server_side:
        EmbeddedServer(SOURCE_REPOSITORY, ports=free_ports(), security=Security(access_key_file=bad)).start()
    assert "tooshort" not in str(server_side.value)
    assert not os.path.exists(shared_memory_secret_path(free_ports().grpc))
