"""The measurement behind the lumireg model's queue policy (README, "Deploying in a hospital").

    OMP_NUM_THREADS=1 .venv/bin/python tests/hospital/measure_queue_policy.py POLICY BURST [POLICY BURST ...]

POLICY is ``none`` (unbounded, the old config) or ``QUEUE_SIZE:TIMEOUT_S``. For each, starts the embedded server
on a repository with that policy, sends BURST concurrent displacement-only requests, and prints the outcomes,
the latencies and the peak resident memory of tritonserver and its stubs (baseline first).
"""

import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from overload import PeakMemory, burst, repository_with_policy, server_rss  # noqa: E402

from lumireg.contract import intensities_to_uint8  # noqa: E402
from lumireg.service.server import EmbeddedServer, free_ports  # noqa: E402
from lumireg.train.synthetic import evaluation_seeds, synthetic_pair  # noqa: E402


def main(argv: list[str]) -> None:
    sample = synthetic_pair(evaluation_seeds(3)[2])
    pair = {k: intensities_to_uint8(sample[k].numpy())[None] for k in ("fixed", "moving")}
    for policy, n in zip(argv[::2], argv[1::2]):
        size, timeout_s = (None, 60) if policy == "none" else map(int, policy.split(":"))
        with tempfile.TemporaryDirectory() as folder:
            root = repository_with_policy(Path(folder), size, timeout_s * 1_000_000)
            with EmbeddedServer(root, ports=free_ports(), log=Path(folder) / "log") as server:
                burst(server.grpc_url, 1, pair, 120)  # warm-up
                baseline = server_rss(server.process.pid)
                start = time.monotonic()
                with PeakMemory(server.process.pid) as memory:
                    outcomes = burst(server.grpc_url, int(n), pair, 600)
                ok = sorted(s for o, s in outcomes if o == "ok")
                print(
                    json.dumps(
                        {
                            "policy": policy,
                            "burst": int(n),
                            "outcomes": Counter(o for o, _ in outcomes),
                            "ok_seconds_max": round(ok[-1], 1) if ok else None,
                            "refused_seconds_max": round(max((s for o, s in outcomes if o != "ok"), default=0), 2),
                            "wall_s": round(time.monotonic() - start, 1),
                            "baseline_gib": round(baseline / 2**30, 2),
                            "peak_gib": round(memory.peak / 2**30, 2),
                            "ready_after": server.ready(),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1:])
