"""``--url`` with one server or many: the gRPC target and channel arguments it becomes, and clear refusals.
(Requests over several real servers: tests/hospital/test_many_servers.py.)"""

import pytest

from lumireg.cli import main
from lumireg.client import RegistrationClient
from lumireg.client.endpoints import MAX_RECONNECT_BACKOFF_MS, channel_args, parse
from lumireg.contract import EXIT_USAGE, KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS, MIN_PING_INTERVAL_MS


def test_one_server_is_passed_on_as_given_and_may_use_shared_memory():
    one = parse("localhost:8001")
    assert (one.target, one.servers, one.several, one.loopback) == ("localhost:8001", ("localhost:8001",), False, True)
    assert "127.0.0.1:8001" in one.each()  # a name's addresses, for per-server diagnostics
    assert not parse("[::1]:8001").several and parse("[::1]:8001").loopback
    assert not parse("10.1.2.3:8001").loopback


def test_several_servers_become_one_static_grpc_target():
    many = parse(" 127.0.0.1:8001, localhost:8011 ,127.0.0.2:8021")
    assert many.target == "ipv4:127.0.0.1:8001,127.0.0.1:8011,127.0.0.2:8021"
    assert many.several and not many.loopback  # shared memory only with one server
    assert many.each() == ["127.0.0.1:8001", "localhost:8011", "127.0.0.2:8021"]
    assert parse("[::1]:8001,[::1]:8002").target == "ipv6:[::1]:8001,[::1]:8002"


def test_grpc_target_uris_are_taken_as_they_are():
    for uri in ("dns:///lumireg-headless.imaging.svc:8001", "ipv4:10.0.0.1:8001,10.0.0.2:8001"):
        assert parse(uri).target == uri and not parse(uri).loopback


@pytest.mark.parametrize(
    "url, says",
    [
        ("", "no server given"),
        ("localhost", "expected host:port"),
        ("localhost:0", "expected host:port"),
        ("localhost:http", "expected host:port"),
        ("a.invalid:1,,b.invalid:2", "empty entry"),
        ("127.0.0.1:8001,127.0.0.1:8001", "listed twice"),
        ("127.0.0.1:8001,no-such-host.invalid:8001", "cannot resolve host 'no-such-host.invalid'"),
        ("127.0.0.1:8001,[::1]:8002", "no address family in common"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url, says):
    with pytest.raises(ValueError, match=says):
        parse(url)


def test_channel_arguments_balance_reconnect_soon_and_keep_tritonclients_limits():
    args = dict(channel_args())
    assert args["grpc.lb_policy_name"] == "round_robin"
    assert args["grpc.max_reconnect_backoff_ms"] == MAX_RECONNECT_BACKOFF_MS
    assert args["grpc.max_receive_message_length"] >= 2**31 - 1  # an 82 MB field must come back
    assert args["grpc.keepalive_time_ms"] == KEEPALIVE_MS and args["grpc.http2.max_pings_without_data"] == 0
    assert args["grpc.keepalive_timeout_ms"] == args["grpc.http2.ping_timeout_ms"] == KEEPALIVE_TIMEOUT_MS
    assert KEEPALIVE_MS >= MIN_PING_INTERVAL_MS  # the server (lumireg serve) accepts the pings
    assert "grpc.ssl_target_name_override" not in args
    assert dict(channel_args("lumireg.example"))["grpc.ssl_target_name_override"] == "lumireg.example"


def test_shared_memory_is_refused_for_several_servers():
    with pytest.raises(ValueError, match="shared memory needs one server"):
        RegistrationClient("127.0.0.1:8001,127.0.0.1:8002", transport="shm")
    with RegistrationClient("127.0.0.1:8001,127.0.0.1:8002") as client:
        assert client.transport_name == "grpc"


def test_register_says_what_is_wrong_with_the_url(tmp_path, capsys):
    code = main(["register", "a.nii.gz", "b.nii.gz", "-o", str(tmp_path), "--url", "127.0.0.1:8001,,"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty entry" in err[0], err
