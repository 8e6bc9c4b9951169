"""``lumireg export``: a checkpoint into a Triton model repository, checked against PyTorch.

Writes the repository's configs (:mod:`lumireg.export.repository`), the
network file (ONNX, or a TensorRT plan with ``--trt``), runs the parity check
(:func:`lumireg.export.onnx.check_parity`) and records what was exported in
``lumireg_network/1/export.json`` (weights, their sha256, parity, versions),
which the ``lumireg`` model reads for its QC report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from lumireg.contract import (
    CHECKPOINT_FILE,
    EXIT_FAILURE,
    EXIT_MISSING_DEPENDENCY,
    EXIT_OK,
    EXIT_USAGE,
    EXPORT_RECORD,
    ONNX_FILE,
)
from lumireg.export import repository  # no torch: `lumireg --help` stays light


def export(
    checkpoint: str | Path | None = None,
    root: str | Path = repository.SOURCE_REPOSITORY,
    variant: str = "python",
    fp16: bool = False,
    log=print,
) -> dict:
    """Export ``checkpoint`` (default: the bundled weights) into the repository at ``root``; returns the record."""
    from lumireg.export import tensorrt
    from lumireg.export.onnx import (
        OPSET,
        PARITY_TOLERANCE,
        check_parity,
        export_onnx,
        onnxruntime_runner,
        onnxruntime_session,
    )
    from lumireg.network.checkpoint import DEFAULT_WEIGHTS, load_model, read_checkpoint

    checkpoint = Path(checkpoint or DEFAULT_WEIGHTS)
    if fp16 and variant != "tensorrt":
        raise ValueError("fp16 applies to TensorRT plans only (--trt)")
    state = read_checkpoint(checkpoint)
    model = load_model(checkpoint)
    root = repository.write_repository(root, variant)
    target = repository.network_path(root, variant)
    start = time.perf_counter()
    if variant == "tensorrt":
        with tempfile.TemporaryDirectory() as scratch:
            onnx_path = export_onnx(model, Path(scratch) / ONNX_FILE)
            tensorrt.build_plan(onnx_path, target, fp16=fp16)
        runner, tolerance = tensorrt.plan_runner(target), tensorrt.FP16_TOLERANCE if fp16 else PARITY_TOLERANCE
    else:
        export_onnx(model, target)
        runner, tolerance = onnxruntime_runner(onnxruntime_session(target)), PARITY_TOLERANCE
    log(f"wrote {target} in {time.perf_counter() - start:.1f} s; checking it against PyTorch ...")
    parity = check_parity(model, runner, tolerance=tolerance)
    record = {
        "weights": f"{checkpoint.stem} (step {state.get('step', 0)}, sha256 {_sha256(checkpoint)[:12]})",
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": _sha256(checkpoint),
        "step": int(state.get("step", 0)),
        "steps": model.config.steps,
        "variant": variant,
        "network_file": target.name,
        "precision": "fp16" if fp16 else "fp32",
        "opset": OPSET,
        "parity_max_abs_velocity": parity,
        "parity_tolerance": tolerance,
        "versions": {name: _version(name) for name in ("lumireg", "torch", "onnx", "onnxruntime", "tensorrt")},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shutil.copyfile(checkpoint, target.parent / CHECKPOINT_FILE)
    (target.parent / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for name, difference in parity.items():
        log(f"parity, {name}: max |exported - PyTorch| velocity = {difference:.2e} half-res voxels (<= {tolerance:g})")
    return record


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except Exception:
        return None


def run(args: argparse.Namespace) -> int:
    """``lumireg export``; returns an exit code of :mod:`lumireg.contract`: ``EXIT_MISSING_DEPENDENCY`` when
    TensorRT or a GPU is missing, ``EXIT_USAGE`` for bad options or a missing checkpoint, ``EXIT_FAILURE`` when
    the export or its parity check fails."""
    from lumireg.export.tensorrt import ExportUnavailable

    variant = "tensorrt" if args.trt else args.variant
    try:
        record = export(args.checkpoint, args.repository, variant, fp16=args.fp16)
    except ExportUnavailable as exc:
        print(f"lumireg export: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    except (ValueError, FileNotFoundError) as exc:
        print(f"lumireg export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        print(f"lumireg export: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"exported {record['weights']} into {args.repository} ({variant} variant)")
    return EXIT_OK


def add_parser(sub) -> None:
    export_parser = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX / TensorRT into a model repository",
        description=__doc__.splitlines()[0],
    )
    export_parser.add_argument("--checkpoint", help="weights to export (default: the bundled weights)")
    export_parser.add_argument(
        "--repository",
        default=str(repository.SOURCE_REPOSITORY),
        help="model repository to write (default: the project's model_repository/)",
    )
    export_parser.add_argument(
        "--variant",
        choices=repository.VARIANTS,
        default="python",
        help="who runs the network: python (ONNX Runtime in the python backend, the embedded "
        "server), onnx (Triton's onnxruntime backend), tensorrt (default: python)",
    )
    export_parser.add_argument("--trt", action="store_true", help="build a TensorRT plan (same as --variant tensorrt)")
    export_parser.add_argument("--fp16", action="store_true", help="with --trt: a half-precision plan")
    export_parser.set_defaults(func=run)
