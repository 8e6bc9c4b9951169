"""The open-loop load test against the real embedded server: a clean run, injected bad requests, bad options,
server memory and /dev/shm regions (the soak's checks)."""

import json
import mmap
import uuid
from argparse import Namespace
from pathlib import Path

import numpy as np
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


def _report(folder, name: str = "load") -> dict:
    (path,) = folder.glob(f"**/{name}.json")
    assert (path.parent / f"{name}.png").stat().st_size > 0
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


def test_load_run_samples_the_servers_memory_and_dev_shm(load_run, server):
    report = _report(load_run.folder)
    memory, shared = report["memory"], report["shared_memory"]
    assert memory["measured"] and memory["measure"].startswith(("PSS", "RSS"))
    assert memory["interval_s"] == pytest.approx(3.0 / 20) and memory["warmup_s"] == pytest.approx(0.6)
    samples = memory["samples"]
    span = samples[-1]["t_s"] - samples[0]["t_s"]
    assert span >= 3.0 - 1.0 and abs(len(samples) - (span / memory["interval_s"] + 1)) <= max(3, 0.2 * len(samples))
    assert all(s["processes"] == 1 + len(server._stubs) >= 2 for s in samples)  # tritonserver and its stubs
    assert all(100 < s["mib"] < 64_000 for s in samples)
    assert all(b["t_s"] > a["t_s"] for a, b in zip(samples, samples[1:]))

    def window(lo, hi):
        inside = [s["mib"] for s in samples if lo <= s["t_s"] <= hi]
        floor, median, peak = min(inside), np.median(inside), max(inside)
        return {"start_s": lo, "end_s": hi, "floor_mib": floor, "median_mib": median, "peak_mib": peak}

    width = memory["window_s"]
    first, last = window(0.6, 0.6 + width), window(3.0 - width, 3.0)
    assert memory["first_window"] == pytest.approx(first) and memory["last_window"] == pytest.approx(last)
    assert first["floor_mib"] <= first["median_mib"] <= first["peak_mib"]
    assert np.isfinite(memory["growth_percent"])
    for growth, key in (("growth_percent", "floor_mib"), ("peak_growth_percent", "peak_mib")):
        assert memory[growth] == pytest.approx(100 * (last[key] - first[key]) / first[key])
    assert memory["max_after_warmup_mib"] == max(s["mib"] for s in samples if s["t_s"] > 0.6)
    after = [(s["t_s"], s["mib"]) for s in samples if 0.6 < s["t_s"] <= 3.0]
    assert memory["slope_after_warmup_mib_per_min"] == pytest.approx(np.polyfit(*zip(*after), 1)[0] * 60)
    # the server's stub regions are in /dev/shm throughout; the run made none that nothing maps
    stub_regions = {region for _, region in server._stubs.values()}
    assert stub_regions <= set(shared["before"]) & set(shared["after"])
    assert shared["leaked"] == [] and set(shared["new"]) == set(shared["in_use"])
    assert report["checks"]["no_leaked_shared_memory"] and report["checks"]["no_failed_requests"]
    assert report["checks"]["memory_growth_below_limit"] == (memory["growth_percent"] < 5)
    assert "growth" in load_run.stdout and "leaked: none" in load_run.stdout


def _requests_memory(leak_mib_per_min: float, duration: float = 1200.0) -> list[dict]:
    """Samples every second of a server whose memory rises by 500 MiB within each 3.3 s request, one every
    4.76 s (70 % busy), above a floor of 1000 MiB that climbs by ``leak_mib_per_min``."""
    samples = []
    for t in np.arange(0.0, duration, 1.0):
        busy = (t % 4.76) < 3.3
        samples.append({"t_s": float(t), "mib": 1000 + leak_mib_per_min * t / 60 + 500 * busy, "processes": 2})
    return samples


@pytest.mark.parametrize("leak, fails", [(0.0, False), (5.0, True)])
def test_memory_growth_is_the_floors_between_requests(leak, fails):
    memory = load.memory_summary(_requests_memory(leak), 1200.0, 1.0)
    assert memory["first_window"]["start_s"] == 240 and memory["last_window"]["end_s"] == 1200
    # the floors of windows starting 14 minutes apart
    expected = 100 * leak * (1080 - 240) / 60 / (1000 + leak * 4)
    assert memory["growth_percent"] == pytest.approx(expected, abs=0.6)
    assert (memory["growth_percent"] >= load.MAX_GROWTH_PERCENT) == fails
    assert memory["first_window"]["peak_mib"] - memory["first_window"]["floor_mib"] == pytest.approx(500, abs=15)


def test_shared_memory_report_tells_leaked_from_in_use_regions():
    name = f"lumireg-test-{uuid.uuid4().hex}"
    before = load.shm_names()
    leaked, used = Path("/dev/shm", f"{name}-leaked"), Path("/dev/shm", f"{name}-used")
    try:
        leaked.write_bytes(b"x" * 4096)
        used.write_bytes(b"x" * 4096)
        with open(used, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):  # mapped by this live process
            report = load.shared_memory_report(before, load.shm_names(), "test")
        assert used.name in report["new"] and leaked.name in report["new"]
        assert used.name in report["in_use"] and used.name not in report["leaked"]
        assert leaked.name in report["leaked"] and leaked.name not in report["in_use"]
        assert load.shared_memory_report(before, before, "test")["leaked"] == []
    finally:
        leaked.unlink(missing_ok=True)
        used.unlink(missing_ok=True)


def test_soak_fails_on_a_leaked_region(server, tmp_path, monkeypatch, capsys):
    """A region the run leaves behind that nothing maps makes a soak fail though every request succeeded."""
    region = Path("/dev/shm", f"lumireg-test-{uuid.uuid4().hex}")
    real_send = load.send

    def leaking_send(*args, **kwargs):
        records = real_send(*args, **kwargs)
        region.write_bytes(b"x")
        return records

    monkeypatch.setattr(load, "send", leaking_send)
    try:
        assert load.run(_args(server, tmp_path, duration=1.0, soak=True)) == EXIT_FAILURE
    finally:
        region.unlink(missing_ok=True)
    report = _report(tmp_path, "soak")
    assert not list(tmp_path.glob("**/load.json"))
    assert report["benchmark"] == "soak" and report["settings"]["soak"] and report["failed"] == 0
    assert region.name in report["shared_memory"]["leaked"] and report["verdict"] == "fail"
    assert report["checks"]["no_leaked_shared_memory"] is False and report["memory"]["samples"]
    assert "no_leaked_shared_memory" in capsys.readouterr().out


def test_the_server_process_is_found_by_its_grpc_port_on_this_host_only(server):
    assert load.server_process(server.grpc_url) == server.process.pid
    assert load.server_process(f"localhost:{server.ports.grpc}") == server.process.pid
    assert load.server_process(f"192.0.2.1:{server.ports.grpc}") is None  # TEST-NET-1: never this host
    assert load.server_process(f"127.0.0.1:{free_ports().grpc}") is None  # nothing listens there


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
