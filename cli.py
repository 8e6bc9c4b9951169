"""The ``lumireg`` command line: one console script, one subcommand per job.

Subcommands import their modules only when they run, so ``lumireg --help``
and the client's ``register`` never pay for torch. Every command exits with a
code of :data:`lumireg.contract.EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import sys

from lumireg import __version__
from lumireg.contract import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


def _evaluate(args: argparse.Namespace) -> int:
    from lumireg.evaluate import runner

    return runner.run(args)


def _train(args: argparse.Namespace) -> int:
    from lumireg.train.loop import TrainConfig, train

    try:
        config = TrainConfig(
            data=args.data,
            synthetic=args.synthetic,
            init=args.init,
            steps=args.steps,
            batch_size=args.batch_size,
            crop=tuple(int(c) for c in args.crop.split(",")),
            crops_per_pair=args.crops_per_pair,
            lr=args.lr,
            similarity=args.similarity,
            smooth_weight=args.smooth_weight,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            workers=args.workers,
            amp=not args.no_amp,
        )
        model = train(config, args.out, resume=args.resume, device=args.device, command=["lumireg", *sys.argv[1:]])
    except (ValueError, FileNotFoundError) as exc:
        print(f"lumireg train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"trained weights: {model}")
    return EXIT_OK


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train the registration network without labels",
        description="Unsupervised training (NCC or MI + smoothness); torchrun for several processes.",
    )
    train.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (pairs from the bundled MNI template) or a LUMIR dataset JSON (default: synthetic)",
    )
    train.add_argument(
        "--synthetic",
        default="lumir",
        choices=("lumir", "broad"),
        help="synthetic pair distribution: lumir (one 16 mm scale) or broad (+ a coarse 48 mm scale, "
        "more contrasts) (default: lumir)",
    )
    train.add_argument("--init", help="a checkpoint whose weights start the run (fine-tuning; default: fresh weights)")
    train.add_argument(
        "--out", default="runs/train", help="folder for checkpoints, log and loss plot (default: runs/train)"
    )
    train.add_argument("--steps", type=int, default=2000, help="optimiser steps in all (default: 2000)")
    train.add_argument("--batch-size", type=int, default=1, help="pairs per step and process (default: 1)")
    train.add_argument(
        "--crop", default="96,96,96", help="training window D,H,W in voxels, multiples of 16 (default: 96,96,96)"
    )
    train.add_argument("--crops-per-pair", type=int, default=2, help="training windows cut from each pair (default: 2)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    train.add_argument(
        "--similarity", choices=("ncc", "mi"), default="ncc", help="ncc (same contrast) or mi (cross-contrast)"
    )
    train.add_argument("--smooth-weight", type=float, default=1.0, help="weight of |grad v|^2 (default: 1.0)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights and the data stream (default: 0)")
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    train.add_argument("--log-every", type=int, default=10, help="steps between log rows (default: 10)")
    train.add_argument("--workers", type=int, default=1, help="data-loading processes (default: 1)")
    train.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    train.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast for the network on CUDA")
    train.add_argument("--resume", help="a checkpoint.pt to continue from")
    train.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumireg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lumireg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    from lumireg.export.runner import add_parser as add_export

    add_export(sub)
    from lumireg.service.runner import add_parser as add_serve

    add_serve(sub)
    from lumireg.client.command import add_parser as add_register

    add_register(sub)
    from lumireg.pacs.command import add_parser as add_pacs

    add_pacs(sub)

    evaluate = sub.add_parser("evaluate", help="score displacement fields with the LUMIR metrics")
    evaluate.add_argument("-i", "--input", required=True, help="folder of disp_{fixedID}_{movingID}.nii.gz fields")
    evaluate.add_argument("-d", "--data", required=True, help="ground truth: imagesVal/, labelsVal/, landmarksVal/")
    evaluate.add_argument("-c", "--config", required=True, action="append", help="evaluation config JSON (repeatable)")
    evaluate.add_argument("-o", "--output", default="metrics.json", help="metrics JSON to write (default metrics.json)")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_evaluate)

    from lumireg.benchmarks import add_parser as add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"lumireg {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
