"""``lumireg register``: one pair, or a batch of pairs from a LUMIR JSON or a CSV, through a lumireg server.

One pair writes the outputs asked for into ``-o OUT_DIR`` (``displacement.nii.gz``,
``warped.nii.gz``, ``warped_labels.nii.gz``, ``inverse_displacement.nii.gz``,
``displacement_itk.nii.gz``, ``qc.json``). A batch (``--pairs``) writes one
folder per pair, or with ``--lumir-submission`` exactly the challenge's
``disp_{fixedID}_{movingID}.nii.gz`` files (float32; ``--fp16`` writes
``.npz`` float16 instead, which NIfTI cannot hold and the evaluators read).
Every file is written whole or not at all, so a batch can be stopped and
started again: finished pairs are skipped.

Exit codes: 0 all done, 1 some pair failed, 2 bad input or usage, 3 no server.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

DEFAULT_OUTPUTS = "displacement,warped,qc"


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds, so shared memory regions are released on the way out


def read_pairs(path: Path, data_dir: Path | None) -> list[tuple[Path, Path, str, str]]:
    """``(fixed, moving, fixed name, moving name)`` per pair of a LUMIR JSON (``eval_pairs`` or ``validation``) or a CSV."""
    if not path.is_file():
        raise FileNotFoundError(f"no pairs file at {path}")
    base = data_dir or path.parent
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        entries = data.get("eval_pairs") or data.get("validation") if isinstance(data, dict) else None
        if not entries:
            raise ValueError(f"{path}: expected an 'eval_pairs' or 'validation' list of {{fixed, moving}}")
        rows = [(e["fixed"], e["moving"]) for e in entries]
    else:
        with path.open(newline="") as handle:
            rows = [tuple(r[:2]) for r in csv.reader(handle) if r and not r[0].startswith("#")]
        if rows and rows[0][0].strip().lower() == "fixed":
            rows = rows[1:]
        if not rows or any(len(r) < 2 for r in rows):
            raise ValueError(f"{path}: expected two columns, fixed and moving")
    return [(base / f.strip(), base / m.strip(), f.strip(), m.strip()) for f, m in rows]


def _pair_target(out_dir: Path, fixed_name: str, moving_name: str, submission: bool, fp16: bool) -> Path:
    from lumireg.contract import lumir_case_names as case_names

    names = case_names(fixed_name, moving_name)
    if submission:
        if names is None:
            raise ValueError(f"--lumir-submission needs LUMIR file names (..._XXXX_YYYY.nii.gz), got {fixed_name}")
        return out_dir / (names[1] + (".npz" if fp16 else ".nii.gz"))
    stem = names[1] if names else f"{_stem(fixed_name)}__{_stem(moving_name)}"
    return out_dir / stem


def _stem(name: str) -> str:
    return Path(name).name.removesuffix(".gz").removesuffix(".nii")


def _save_submission(result, target: Path, fp16: bool) -> None:
    import nibabel as nib
    import numpy as np

    partial = target.with_name(f".partial-{target.name}")
    field = result.displacement
    if fp16:
        with partial.open("wb") as handle:
            np.savez(handle, np.asarray(field.dataobj, dtype=np.float16))
    else:
        nib.save(field, str(partial))
    partial.replace(target)


def _single(args, client, outputs) -> int:
    from lumireg.client.registration import FILES

    result = client.register(args.fixed, args.moving, outputs, moving_labels=args.labels,
                             precision=args.precision, field_format=args.field_format)
    written = result.save(args.out)
    for name in written:
        print(f"{name}: {Path(args.out) / FILES[name]}")
    if result.qc:
        print(f"qc: NDV {result.qc['ndv_percent']:.4f} %, NCC {result.qc['ncc_before']:.3f} -> "
              f"{result.qc['ncc_after']:.3f}, min Jacobian {result.qc['jacobian_min']:.3f}")
    return 0


def _batch(args, client, outputs) -> int:
    from tqdm import tqdm

    from lumireg.client.registration import FILES

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = read_pairs(Path(args.pairs), Path(args.data_dir) if args.data_dir else None)
    if args.lumir_submission:
        outputs = ("displacement",)
    todo, skipped = [], 0
    for fixed, moving, fixed_name, moving_name in pairs:
        target = _pair_target(out_dir, fixed_name, moving_name, args.lumir_submission, args.fp16)
        done = target.is_file() if args.lumir_submission else all((target / FILES[o]).is_file() for o in outputs)
        if done:
            skipped += 1
        else:
            todo.append((fixed, moving, target))

    def one(fixed, moving, target):
        result = client.register(fixed, moving, outputs, precision=args.precision, field_format=args.field_format)
        if args.lumir_submission:
            _save_submission(result, target, args.fp16)
        else:
            result.save(target)

    failures, start = [], time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = {pool.submit(one, *job): job for job in todo}
        for future in tqdm(as_completed(futures), total=len(futures), desc="register", unit="pair"):
            if future.exception() is not None:
                fixed, moving, _ = futures[future]
                failures.append(f"{fixed.name} <- {moving.name}: {future.exception()}")
    seconds = time.perf_counter() - start
    done = len(todo) - len(failures)
    print(f"registered {done} pair(s) in {seconds:.1f} s ({done / seconds if seconds else 0:.2f} pairs/s); "
          f"{skipped} already done; {len(failures)} failed")
    for failure in failures:
        print(f"  failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def run(args: argparse.Namespace) -> int:
    from tritonclient.utils import InferenceServerException

    from lumireg.client.registration import InputError, LumiregError, RegistrationClient, ServerUnavailable

    if bool(args.pairs) == bool(args.fixed and args.moving) or (args.fixed and not args.moving):
        print("lumireg register: give FIXED MOVING, or --pairs PAIRS", file=sys.stderr)
        return 2
    outputs = tuple(o.strip() for o in args.outputs.split(",") if o.strip())
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with RegistrationClient(args.url, transport=args.transport, timeout=args.timeout,
                                retry_seconds=args.retry_seconds, concurrency=args.concurrency) as client:
            try:
                live = client.client.is_server_live(client_timeout=10)
            except InferenceServerException:
                live = False
            if not live:
                raise ServerUnavailable(f"no lumireg server answers at {args.url}; start one with `lumireg serve`")
            return _batch(args, client, outputs) if args.pairs else _single(args, client, outputs)
    except ServerUnavailable as exc:
        print(f"lumireg register: {exc}", file=sys.stderr)
        return 3
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"lumireg register: {exc}", file=sys.stderr)
        return 2
    except LumiregError as exc:
        print(f"lumireg register: {exc}", file=sys.stderr)
        return 1


def add_parser(sub) -> None:
    register = sub.add_parser("register", help="register a fixed and a moving NIfTI image through the service",
                              description=__doc__.split("\n\n")[0])
    register.add_argument("fixed", nargs="?", help="fixed image (NIfTI)")
    register.add_argument("moving", nargs="?", help="moving image (NIfTI)")
    register.add_argument("-o", "--out", required=True, help="output folder")
    register.add_argument("--labels", help="label map on the moving image's grid (for warped_labels)")
    register.add_argument("--outputs", default=DEFAULT_OUTPUTS,
                          help="comma-separated: displacement, inverse_displacement, warped, warped_labels, qc "
                               f"(default: {DEFAULT_OUTPUTS})")
    register.add_argument("--url", default="localhost:8001", help="the server's gRPC host:port (default: localhost:8001)")
    register.add_argument("--transport", choices=("auto", "shm", "grpc"), default="auto",
                          help="auto: shared memory on this host, gRPC payloads otherwise (default: auto)")
    register.add_argument("--precision", choices=("float16", "float32"), default="float16",
                          help="displacement precision on the wire (default: float16; files are float32)")
    register.add_argument("--field-format", choices=("lumir", "itk"), default="lumir",
                          help="itk: also write displacement_itk.nii.gz for antsApplyTransforms (default: lumir)")
    register.add_argument("--pairs", help="batch: a LUMIR dataset / evaluation JSON or a fixed,moving CSV")
    register.add_argument("--data-dir", help="batch: folder the pair paths are relative to (default: the file's folder)")
    register.add_argument("--concurrency", type=int, default=2, help="batch: requests in flight (default: 2)")
    register.add_argument("--lumir-submission", action="store_true",
                          help="batch: write the challenge's disp_{fixedID}_{movingID}.nii.gz files")
    register.add_argument("--fp16", action="store_true", help="with --lumir-submission: float16 .npz files")
    register.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    register.add_argument("--retry-seconds", type=float, default=60.0,
                          help="how long to retry while the server is unavailable (default: 60)")
    register.set_defaults(func=run)
