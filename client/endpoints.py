"""Where the client's requests go: one server or many, as one gRPC channel that balances over them.

``--url`` / ``RegistrationClient(url=...)`` takes:

- ``host:port``: one server, or a DNS name with several addresses (a Kubernetes headless Service: one
  address per ready pod); gRPC resolves the name itself and re-resolves it when a connection drops;
- ``host:port,host:port,...``: several servers; each host is resolved once, here, and the list becomes
  gRPC's static target ``ipv4:a:p,b:q`` (``ipv6:`` when the hosts only have IPv6 addresses);
- any gRPC target URI (``dns:///name:port``, ``ipv4:...``, ``ipv6:...``), passed on as it is.

How many servers reach tritonclient: ``InferenceServerClient`` hands its ``url`` unchanged to
``grpc.insecure_channel`` / ``grpc.secure_channel`` (tritonclient 2.73), so the target above is its url,
and :func:`channel_args` its ``channel_args``: the ``round_robin`` load-balancing policy (one connection
per address; each call goes to the next *ready* one, so a server whose connection fails, or that never
came up, is skipped until it reconnects), reconnection backoff of 1 s growing to at most
:data:`MAX_RECONNECT_BACKOFF_MS` (gRPC's default grows to 120 s, which would keep a restarted server idle
for minutes), tritonclient's message size limits (``channel_args`` replaces its defaults), and keepalive pings
while a request is in flight (:data:`lumireg.contract.KEEPALIVE_MS`), so a server that hangs or becomes
unreachable with its connection open is dropped after at most 30 s. No scheduler of our own: requests in flight
on a server that dies or hangs fail with ``UNAVAILABLE`` and :meth:`lumireg.client.RegistrationClient.infer`
sends them again, which gRPC routes to a ready server.

Shared memory needs the server's own host: only a single loopback server (:attr:`Endpoints.loopback`).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import tritonclient.grpc as grpcclient

from lumireg.contract import KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS

LOOPBACK = {"localhost", "127.0.0.1", "::1"}
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")  # gRPC target URIs taken as they are
MAX_RECONNECT_BACKOFF_MS = 5000
INITIAL_RECONNECT_BACKOFF_MS = 1000


@dataclass(frozen=True)
class Endpoints:
    """The servers of one ``--url``.

    Attributes:
        url: the text as given (messages quote it).
        servers: ``host:port`` of each server named (one for a single name or a target URI).
        target: the gRPC target the channel connects to (tritonclient's ``url``).
    """

    url: str
    servers: tuple[str, ...]
    target: str

    @property
    def several(self) -> bool:
        """True when ``url`` lists more than one server."""
        return len(self.servers) > 1

    @property
    def loopback(self) -> bool:
        """True for exactly one server on this host's loopback (the only case where shared memory can work)."""
        return not self.several and not self.target.startswith(SCHEMES) and split(self.servers[0])[0] in LOOPBACK

    def each(self) -> list[str]:
        """One ``host:port`` per server address: the servers listed, or every address a single name resolves to
        now (for per-server diagnostics); the name itself when it does not resolve."""
        if self.several or self.target.startswith(SCHEMES):
            return list(self.servers)
        host, port = split(self.servers[0])
        try:
            addresses = _resolve(host, port)
        except ValueError:
            return list(self.servers)
        return [_join(address, port) for address in addresses]


def split(server: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> ``(host, port)``; ``ValueError`` naming the entry when malformed."""
    host, colon, port = server.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--url: expected host:port (port 1..65535), got {server.strip()!r}")
    return host, int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(host: str, port: int) -> list[str]:
    """The distinct addresses of ``host``, IPv4 first; ``ValueError`` when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"--url: cannot resolve host {host!r} ({exc})") from None
    addresses = dict.fromkeys(info[4][0] for info in infos)
    return sorted(addresses, key=lambda a: ipaddress.ip_address(a).version)


def parse(url: str) -> Endpoints:
    """The :class:`Endpoints` of ``url`` (see the module docstring); ``ValueError`` with the reason when it is
    empty, an entry is not ``host:port``, a server is listed twice, or a listed host does not resolve."""
    text = (url or "").strip()
    if not text:
        raise ValueError("--url: no server given (expected host:port, or several separated by commas)")
    if text.startswith(SCHEMES):
        return Endpoints(text, (text,), text)
    entries = [entry.strip() for entry in text.split(",")]
    if any(not entry for entry in entries):
        raise ValueError(f"--url: an empty entry in {text!r} (separate servers with single commas)")
    parsed = [split(entry) for entry in entries]
    if len(entries) == 1:
        return Endpoints(text, (entries[0],), entries[0])
    if len(set(parsed)) < len(parsed):
        raise ValueError(f"--url: a server is listed twice in {text!r}")
    by_family: dict[int, list[str]] = {4: [], 6: []}
    for host, port in parsed:
        addresses = _resolve(host, port)
        for version in (4, 6):
            first = next((a for a in addresses if ipaddress.ip_address(a).version == version), None)
            by_family[version].append(_join(first, port) if first else None)
    version = 4 if all(by_family[4]) else 6 if all(by_family[6]) else None
    if version is None:
        raise ValueError(f"--url: the servers of {text!r} have no address family in common (IPv4 or IPv6)")
    return Endpoints(text, tuple(entries), f"ipv{version}:" + ",".join(by_family[version]))


def channel_args(tls_name: str | None = None) -> list[tuple[str, object]]:
    """The gRPC channel arguments of every lumireg client (see the module docstring).

    ``tls_name``: the host name the servers' TLS certificates are checked against when the target is a list of
    addresses (``grpc.ssl_target_name_override``); None otherwise.
    """
    args = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        # tritonclient's message limits, which channel_args replaces
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        # pings while a request is in flight (none when idle), however long the server computes without answering
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),  # gRPC >= 1.5x waits this (default 60 s) for the ack
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if tls_name:
        args.append(("grpc.ssl_target_name_override", tls_name))
    return args
