"""How the client proves who it is and protects the wire: TLS, mutual TLS, the access key, the shared-memory secret.

- TLS: ``tls=True`` (or any of ``tls_ca`` / ``tls_cert`` / ``tls_key``) opens a TLS channel; ``tls_ca`` names the
  CA that signed the server's certificate (default: the system's roots); ``tls_cert`` + ``tls_key`` are the
  client's own certificate for a server with mutual TLS.
- Access key: from ``--access-key-file`` or the environment variable :data:`~lumireg.contract.ACCESS_KEY_ENV`;
  sent on every call as the header Triton's restricted protocols check. Never printed: the :class:`Credentials`
  repr hides it and no message of this package contains it.
- Shared memory beyond loopback: a server listening beyond loopback answers shared-memory calls only with the
  secret in its local file (:func:`lumireg.contract.shared_memory_secret_path`); a client on the same host reads it.

:func:`diagnose` turns "nothing answers" into the likely reason (a TLS server and a plaintext client, or the
reverse, an untrusted certificate, a missing client certificate), with the standard library's ``ssl``.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient._plugin import InferenceServerClientPlugin

from lumireg.contract import (
    ACCESS_KEY_ENV,
    ACCESS_KEY_HEADER,
    GRPC_RESTRICTED_PREFIX,
    SHARED_MEMORY_HEADER,
    check_access_key,
    shared_memory_secret_path,
)

GRPC_ACCESS_HEADER = GRPC_RESTRICTED_PREFIX + ACCESS_KEY_HEADER
GRPC_SHARED_MEMORY_HEADER = GRPC_RESTRICTED_PREFIX + SHARED_MEMORY_HEADER


@dataclass(frozen=True)
class Credentials:
    """TLS files and the access key of one client (all optional); ``repr`` never shows the key."""

    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    access_key: str | None = field(default=None, repr=False)

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key)

    def check(self) -> None:
        """``ValueError`` naming the option whose file is missing or unreadable, or a half-given client certificate."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")
        for option, path in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{option}: cannot read {path}")


def read_access_key(path: str | os.PathLike | None = None, environ=os.environ) -> str | None:
    """The access key from ``path``, else from ``$LUMIREG_ACCESS_KEY``, else None.

    ``ValueError`` naming the file (or the variable), never the key, when it cannot be read or is malformed.
    """
    if path:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--access-key-file: cannot read {path} ({exc.__class__.__name__})") from None
        return check_access_key(text, f"--access-key-file {path}")
    if environ.get(ACCESS_KEY_ENV):
        return check_access_key(environ[ACCESS_KEY_ENV], f"${ACCESS_KEY_ENV}")
    return None


class _AccessKey(InferenceServerClientPlugin):
    """tritonclient plugin: the access key header on every call."""

    def __init__(self, key: str):
        self._key = key

    def __call__(self, request) -> None:
        request.headers[GRPC_ACCESS_HEADER] = self._key

    def __repr__(self) -> str:
        return "_AccessKey(<hidden>)"


def grpc_client(
    url: str, credentials: Credentials, channel_args: list | None = None
) -> grpcclient.InferenceServerClient:
    """A tritonclient gRPC client for ``url`` (any gRPC target) with the TLS settings and the access key of
    ``credentials``; ``channel_args`` replace tritonclient's (:func:`lumireg.client.endpoints.channel_args`)."""
    tls = {}
    if credentials.uses_tls:
        tls = dict(
            ssl=True,
            root_certificates=credentials.tls_ca,
            private_key=credentials.tls_key,
            certificate_chain=credentials.tls_cert,
        )
    client = grpcclient.InferenceServerClient(url, channel_args=channel_args, **tls)
    if credentials.access_key:
        client.register_plugin(_AccessKey(credentials.access_key))
    return client


def shared_memory_headers(url: str) -> dict[str, str] | None:
    """The shared-memory secret header for the server at ``url`` when its local secret file exists (the server
    listens beyond loopback); None otherwise (none needed, or not readable by this user)."""
    try:
        port = int(url.rsplit(":", 1)[1])
        secret = Path(shared_memory_secret_path(port)).read_text().strip()
    except (IndexError, ValueError, OSError):
        return None
    return {GRPC_SHARED_MEMORY_HEADER: secret} if secret else None


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.rpartition(":")
    return host.strip("[]") or "localhost", int(port)


def diagnose(url: str, credentials: Credentials, timeout: float = 5.0) -> str:
    """Why a gRPC call to ``url`` may have found nobody, as a phrase to append to the error ("" when no better
    reason is found): nothing listens; the server speaks TLS and the client does not, or the reverse; the server's
    certificate is not trusted by ``tls_ca``; the server (mutual TLS) wants a client certificate."""
    try:
        host, port = _host_port(url)
        raw = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError):
        return ""  # nothing listens: the caller's own message says so
    with raw:
        context = ssl.create_default_context(cafile=credentials.tls_ca)
        if not credentials.uses_tls:  # only: does the server speak TLS at all?
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        elif credentials.tls_cert:
            context.load_cert_chain(credentials.tls_cert, credentials.tls_key)
        context.set_alpn_protocols(["h2"])
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(min(timeout, 2.0))
                try:
                    # TLS 1.3: a server that wants another client certificate hangs up after the handshake;
                    # a gRPC server that accepts the client greets it with its HTTP/2 settings
                    closed = tls.recv(1) == b""
                except TimeoutError:
                    closed = False
                if closed and credentials.uses_tls:
                    if credentials.tls_cert:
                        return (
                            " (the server hung up after the TLS handshake: it does not accept this client certificate)"
                        )
                    return " (the server requires a client certificate: mutual TLS; give --tls-cert and --tls-key)"
        except ssl.SSLCertVerificationError as exc:
            return (
                f" (the server's TLS certificate is not trusted: {exc.verify_message}; "
                "give the CA that signed it with --tls-ca)"
            )
        except ssl.SSLError as exc:
            reason = (exc.reason or "").lower()
            wants_certificate = "certificate_required" in reason or "certificate required" in str(exc).lower()
            if not credentials.uses_tls:
                return _SPEAKS_TLS if wants_certificate else ""
            if wants_certificate:
                return " (the server requires a client certificate: mutual TLS; give --tls-cert and --tls-key)"
            if "wrong_version" in reason or "record" in reason or "packet" in reason:
                return " (the server does not speak TLS: drop --tls / --tls-ca / --tls-cert)"
            if "unknown_ca" in reason or "bad_certificate" in reason:
                return " (the server refused this client's certificate: it is not signed by a CA the server trusts)"
            return f" (the TLS handshake failed: {exc.reason or exc})"
        except OSError:
            if credentials.uses_tls:
                return " (the server closed the connection during the TLS handshake: does it speak TLS?)"
            return ""
        return "" if credentials.uses_tls else _SPEAKS_TLS


_SPEAKS_TLS = " (the server speaks TLS: connect with --tls, and --tls-ca for a private CA)"
