"""Benchmarks, one ``lumireg bench`` subcommand each; results per device in ``results/<device>/``.

Each module has ``add_arguments(parser)`` (its own options, help and defaults)
and ``run(args)``, which returns an exit code from :mod:`lumireg.contract`'s
table and writes a JSON that starts with :func:`lumireg.benchmarks.machine.header`.
A module is imported only when its subcommand runs, so ``lumireg --help``
imports neither numpy nor torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lumireg.contract import EXIT_MISSING_DEPENDENCY, EXIT_USAGE

BENCHMARKS = {  # subcommand (= module) -> its line in `lumireg bench --help`
    "service": "latency and throughput of the service across batch sizes, concurrency, transports and outputs",
    "load": "open-loop load test at a fixed arrival rate: latency over time, every error counted",
    "kernels": "time the kernels against the PyTorch reference paths",
    "traffic": "bytes each kernel moves per voxel, counted under Triton's interpreter",
    "accuracy": "Dice / HD95 / NDV of lumireg vs no registration and ANTs SyN on held-out pairs",
    "refine": "cost of one refinement step and of requests with refine steps",
    "align": "cost and accuracy of the affine pre-alignment stage on brains in scanner pose",
    "capacity": "latency against arrival rate for 1..N servers, simulated from the measured service time",
}


class _BenchmarkParser(argparse.ArgumentParser):
    """A subcommand's parser that takes its arguments from ``lumireg.benchmarks.<name>`` when the subcommand is used."""

    def __init__(self, *args, benchmark: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._benchmark = benchmark

    def parse_known_args(self, args=None, namespace=None):
        if self._benchmark:
            name, self._benchmark = self._benchmark, None
            try:
                module = importlib.import_module(f"{__name__}.{name}")
            except ImportError as exc:
                print(f"lumireg bench {name} needs {exc.name or exc}: pip install 'lumireg[server]'", file=sys.stderr)
                sys.exit(EXIT_MISSING_DEPENDENCY)
            module.add_arguments(self)
            self.set_defaults(func=module.run)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:  # say so here, with this benchmark's usage, not the top-level one
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def add_parser(sub) -> None:
    """``lumireg bench service|load|kernels|traffic|accuracy|refine|align|capacity``; ``lumireg bench`` alone lists them
    (EXIT_USAGE)."""
    bench = sub.add_parser(
        "bench",
        help="benchmarks: " + ", ".join(BENCHMARKS),
        description="Benchmarks of lumireg; each subcommand has its own options (--help).",
    )
    modes = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK", parser_class=_BenchmarkParser)
    for name, line in BENCHMARKS.items():
        modes.add_parser(name, help=line, description=line[0].upper() + line[1:] + ".", benchmark=name)

    def list_benchmarks(args: argparse.Namespace) -> int:
        bench.print_help(sys.stderr)
        return EXIT_USAGE

    bench.set_defaults(func=list_benchmarks)
