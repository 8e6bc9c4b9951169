"""The ``lumireg`` command line: one console script, one subcommand per job.

Subcommands import their modules only when they run, so ``lumireg --help``
and the client's ``register`` never pay for torch.
"""

from __future__ import annotations

import argparse
import sys

from lumireg import __version__

# Subcommands whose implementation has not landed yet, with what each will do.
_PLANNED = {
    "serve": "start the Triton Inference Server on the bundled model",
    "register": "register a fixed and a moving NIfTI image through the service",
    "train": "train the registration network without labels",
    "evaluate": "score displacement fields with the LUMIR metrics",
    "export": "export a checkpoint to ONNX / TensorRT into the model repository",
}


def _not_available(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"lumireg {name}: not available in lumireg {__version__} yet.", file=sys.stderr)
        return 2

    return run


def _bench(args: argparse.Namespace) -> int:
    if not args.kernels:
        print(
            "lumireg bench: the service benchmark is not available in this version yet; "
            "use `lumireg bench --kernels` for the kernel micro-benchmark.",
            file=sys.stderr,
        )
        return 2
    from lumireg.benchmarks import kernels

    return kernels.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumireg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lumireg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in _PLANNED.items():
        sub.add_parser(name, help=summary).set_defaults(func=_not_available(name))

    bench = sub.add_parser("bench", help="benchmarks: kernels (--kernels) and, later, the service")
    bench.add_argument("--kernels", action="store_true", help="time the kernels against the PyTorch reference paths")
    # defaults depend on the device: full LUMIR size on a GPU, half of it on a CPU (see lumireg.benchmarks.kernels)
    bench.add_argument("--shape", help="volume size D,H,W in voxels (GPU: 160,224,192; CPU: 80,112,96)")
    bench.add_argument("--batch-sizes", help="comma-separated batch sizes (GPU: 1,4; CPU: 1)")
    bench.add_argument("--warmup", type=int, help="untimed calls before timing (GPU: 3; CPU: 1)")
    bench.add_argument("--repeats", type=int, help="timed calls; the median is reported (GPU: 10; CPU: 3)")
    bench.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON results (a sub-folder per device)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
