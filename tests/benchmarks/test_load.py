"""The open-loop load test against the real embedded server: a clean run, injected bad requests, bad options."""

import json
from argparse import Namespace

import pytest

from lumireg.benchmarks import load
from lumireg.cli import main
from lumireg.contract import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from lumireg.service.server import free_ports


def _args(server, tmp_path, **overrides) -> Namespace:
    settings = dict(
        url=server.grpc_url,
        metrics_url=server.metrics_url,
        rate=1.0,
        duration=3.0,
        outputs="displacement_fp16",
        bad_request_every=None,
        out=str(tmp_path),
    )
    return Namespace(**{**settings, **overrides})


def _report(folder) -> dict:
    (path,) = folder.glob("**/load.json")
    assert (path.parent / "load.png").stat().st_size > 0
    return json.loads(path.read_text())


def test_load_run_reports_every_request(load_run, server):
    assert load_run.code == EXIT_OK, load_run.stderr
    report = _report(load_run.folder)
    assert abs(report["requests_sent"] - round(1.0 * 3.0)) <= 1
    assert report["succeeded"] == report["requests_sent"] and report["failed"] == 0
    assert report["errors_by_type"] == {} and report["error_examples"] == {}
    assert report["rate_target_per_s"] == 1.0 and report["rate_achieved_per_s"] == pytest.approx(1.0, rel=0.1)
    assert 0 < report["completed_per_s"] <= 2.0 and report["duration_s"] == 3.0
    lat = report["latency"]
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] < 120_000 and lat["mean_ms"] > 0
    for r in report["requests"]:
        assert r["error"] is None and r["latency_s"] > 0
        assert r["scheduled_s"] <= r["sent_s"] < r["scheduled_s"] + 0.5 and r["completed_s"] > r["sent_s"]
    windows = report["latency_over_time"]
    assert windows and sum(w["count"] for w in windows) == report["requests_sent"]
    assert all(w["p50_ms"] > 0 and w["p99_ms"] >= w["p50_ms"] for w in windows)
    assert report["server"]["requests"] == report["requests_sent"]
    assert report["server"]["request_ms"] > 0
    assert report["device"] and report["cpu"] and report["date"]
    assert report["versions"]["tritonclient"] and report["target"] == f"server at {server.grpc_url}"
    assert report["settings"]["rate"] == 1.0 and report["settings"]["outputs"] == ["displacement_fp16"]


def test_load_run_counts_injected_bad_requests(server, tmp_path, capsys):
    assert load.run(_args(server, tmp_path, rate=2.0, duration=2.0, bad_request_every=2)) == EXIT_FAILURE
    report = _report(tmp_path)
    bad = [r for r in report["requests"] if r["bad"]]
    assert report["requests_sent"] == 4 and len(bad) == 2
    assert report["errors_by_type"] == {"StatusCode.INVALID_ARGUMENT": 2}
    assert "FP32" in report["error_examples"]["StatusCode.INVALID_ARGUMENT"]
    assert report["succeeded"] == 2 and report["failed"] == 2
    assert all(r["error"] is None for r in report["requests"] if not r["bad"])
    assert report["server"]["requests"] == 2
    assert "2 x StatusCode.INVALID_ARGUMENT" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, says",
    [
        (dict(rate=0.0), "--rate"),
        (dict(duration=-1.0), "--duration"),
        (dict(bad_request_every=0), "--bad-request-every"),
        (dict(outputs="displacement_fp16,bogus"), "bogus"),
    ],
)
def test_load_rejects_bad_options_before_starting_a_server(tmp_path, capsys, monkeypatch, overrides, says):
    monkeypatch.setattr(load, "target", lambda *a: pytest.fail("a server was started"))
    args = Namespace(
        **{
            **dict(
                url=None,
                metrics_url=None,
                rate=1.0,
                duration=1.0,
                outputs="displacement_fp16",
                bad_request_every=None,
                out=str(tmp_path),
            ),
            **overrides,
        }
    )
    assert load.run(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_load_without_a_server_is_unavailable(tmp_path, capsys):
    url = f"127.0.0.1:{free_ports().grpc}"  # nothing listens there
    assert main(["bench", "load", "--url", url, "--duration", "1", "--out", str(tmp_path)]) == EXIT_UNAVAILABLE
    assert url in capsys.readouterr().err and not list(tmp_path.glob("*/load.json"))
