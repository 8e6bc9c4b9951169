"""``lumireg register``: one pair, or a batch of pairs from a LUMIR JSON or a CSV, through a lumireg server.

One pair writes the outputs asked for into ``-o OUT_DIR`` (``displacement.nii.gz``,
``warped.nii.gz``, ``warped_labels.nii.gz``, ``inverse_displacement.nii.gz``,
``displacement_itk.nii.gz``, ``qc.json``); without ``--outputs``: the
displacement, the warped image and the QC report, and the warped labels when
labels are given (``--labels``, or a pair's labels in the pairs file). A batch
(``--pairs``) writes one folder per pair, or with ``--lumir-submission``
exactly the challenge's ``disp_{fixedID}_{movingID}.nii.gz`` files (float32;
``--fp16`` writes ``.npz`` float16 instead, which NIfTI cannot hold and the
evaluators read). Every file is written whole or not at all, so a batch can be
stopped and started again: finished pairs are skipped.

Exit codes (:mod:`lumireg.contract`): 0 all done, 1 some pair failed, the
server refused, or a QC report has warnings (when ``qc`` is asked for, unless
``--allow-warnings``), 2 bad input or usage (a missing or refused access key
too), 3 no server, 130 interrupted (Ctrl-C or SIGTERM).
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
from dataclasses import dataclass
from pathlib import Path

from lumireg.contract import (
    ACCESS_KEY_ENV,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    PARAMETERS,
    lumir_case_names,
)

DEFAULT_OUTPUTS = ("displacement", "warped", "qc")  # and warped_labels for a pair with labels
LABEL_KEY = "moving_label"  # a LUMIR / Learn2Reg dataset JSON entry's moving label map (see lumireg.train.lumir)


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so shared memory regions are released on the way out


@dataclass(frozen=True)
class Pair:
    """One pair of a pairs file: paths resolved against the data folder, and the names the file gives them."""

    fixed: Path
    moving: Path
    moving_labels: Path | None  # the moving image's label map, for warped_labels
    fixed_name: str
    moving_name: str


def read_pairs(path: Path, data_dir: Path | None) -> list[Pair]:
    """The pairs of a LUMIR JSON or a CSV; relative paths are taken from ``data_dir`` (default: the file's folder).

    - JSON: a LUMIR dataset JSON's ``validation`` list or an evaluation
      config's ``eval_pairs`` list of ``{"fixed", "moving"}`` objects; an
      entry may name its moving labels under ``"moving_label"`` (Learn2Reg's
      spelling, as :mod:`lumireg.train.lumir` reads it).
    - CSV: ``fixed,moving[,moving_labels]`` rows, an optional header row
      starting with ``fixed``, ``#`` comments; an empty third cell means no labels.

    Raises ``FileNotFoundError`` (no file) or ``ValueError`` naming the file and the entry.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no pairs file at {path}")
    rows = _json_rows(path) if path.suffix.lower() == ".json" else _csv_rows(path)
    base = data_dir or path.parent
    return [
        Pair(base / fixed, base / moving, base / labels if labels else None, fixed, moving)
        for fixed, moving, labels in rows
    ]


def _json_rows(path: Path) -> list[tuple[str, str, str | None]]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    entries = (data.get("eval_pairs") or data.get("validation")) if isinstance(data, dict) else None
    if not entries or not isinstance(entries, list):
        raise ValueError(f"{path}: expected an 'eval_pairs' or 'validation' list of {{fixed, moving}}")
    rows = []
    for n, entry in enumerate(entries):
        keys = ("fixed", "moving", LABEL_KEY) if isinstance(entry, dict) and LABEL_KEY in entry else ("fixed", "moving")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k].strip() for k in keys):
            raise ValueError(
                f"{path}: entry {n} must be an object with string paths 'fixed', 'moving' "
                f"(and optionally {LABEL_KEY!r}), got {entry!r}"
            )
        rows.append((entry["fixed"].strip(), entry["moving"].strip(), (entry.get(LABEL_KEY) or "").strip() or None))
    return rows


def _csv_rows(path: Path) -> list[tuple[str, str, str | None]]:
    with path.open(newline="") as handle:
        rows = [[cell.strip() for cell in r] for r in csv.reader(handle) if r and not r[0].lstrip().startswith("#")]
    if rows and rows[0][0].lower() == "fixed":
        rows = rows[1:]
    bad = next((n for n, r in enumerate(rows) if len(r) < 2 or not r[0] or not r[1] or len(r) > 3), None)
    if not rows or bad is not None:
        raise ValueError(
            f"{path}: expected rows fixed,moving[,moving_labels]"
            + (f"; row {bad + 1} is {rows[bad]}" if bad is not None else ", found none")
        )
    return [(r[0], r[1], r[2] if len(r) > 2 and r[2] else None) for r in rows]


def _pair_target(out_dir: Path, fixed_name: str, moving_name: str, submission: bool, fp16: bool) -> Path:
    names = lumir_case_names(fixed_name, moving_name)
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


def _parameters(args) -> dict:
    """The request parameters given on the command line (None: the server's default)."""
    return {name: getattr(args, name) for name in PARAMETERS}


def _single(args, client, requested: tuple[str, ...] | None) -> int:
    from lumireg.client.registration import default_outputs

    outputs = requested or default_outputs(args.labels is not None, DEFAULT_OUTPUTS)
    if args.output_format == "dicom":
        from lumireg.client.dicom import is_dicom_source

        if not is_dicom_source(args.fixed):  # refused before anything is sent
            raise ValueError(
                f"--output-format dicom needs a DICOM fixed series (its patient, study and frame of reference), "
                f"got {args.fixed}"
            )
    result = client.register(
        args.fixed,
        args.moving,
        outputs,
        moving_labels=args.labels,
        precision=args.precision,
        field_format=args.field_format,
        fixed_series=args.fixed_series,
        moving_series=args.moving_series,
        **_parameters(args),
    )
    written = result.save(args.out, args.output_format, args.uid_root)
    for name in written:
        print(f"{name}: {written[name]}")
    if result.qc:
        ndv = result.qc["ndv_percent"]  # null over an all-zero moving image
        print(
            f"qc: NDV {'n/a' if ndv is None else f'{ndv:.4f} %'}, NCC {result.qc['ncc_before']:.3f} -> "
            f"{result.qc['ncc_after']:.3f}, min Jacobian {result.qc['jacobian_min']:.3f}"
        )
        refinement = result.qc.get("refinement")
        if refinement:
            print(
                f"refinement: {refinement['steps']} steps of {refinement['similarity']}, "
                f"{refinement['before']:.3f} -> {refinement['after']:.3f}"
            )
        alignment = result.qc.get("alignment")
        if alignment:
            print(
                f"alignment: {alignment['mode']}, {alignment['angle_degrees']:.1f} degrees, shift "
                f"{', '.join(f'{v:.1f}' for v in alignment['shift_mm'])} mm"
                + ("" if alignment["converged"] else " (not converged: centre of mass used)")
            )
    warnings = qc_warnings(result.qc)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_FAILURE if warnings and not args.allow_warnings else EXIT_OK


def qc_warnings(qc: dict | None) -> list[str]:
    """The QC report's warnings as ``"code: message"`` lines (none without a report)."""
    return [f"{warning['code']}: {warning['message']}" for warning in (qc or {}).get("warnings", [])]


@dataclass(frozen=True)
class _Job:
    """One pair of a batch: what to ask for and where its results go (a folder, or a submission file)."""

    pair: Pair
    outputs: tuple[str, ...]
    target: Path


def _batch_jobs(args, pairs: list[Pair], requested: tuple[str, ...] | None) -> list[_Job]:
    """A job per pair; ``ValueError`` before anything runs when ``warped_labels`` is asked for pairs without labels."""
    from lumireg.client.registration import default_outputs

    if args.lumir_submission:
        requested = ("displacement",)
    elif requested and "warped_labels" in requested:
        unlabelled = [p for p in pairs if p.moving_labels is None]
        if unlabelled:
            first = unlabelled[0]
            raise ValueError(
                f"{args.pairs}: --outputs asks for warped_labels, but {len(unlabelled)} pair(s) name no "
                f"moving labels (first: {first.fixed_name} <- {first.moving_name}); give each pair its "
                f"labels (a third CSV column, or {LABEL_KEY!r} in a JSON entry)"
            )
    out_dir = Path(args.out)
    jobs = [
        _Job(
            pair,
            requested or default_outputs(pair.moving_labels is not None, DEFAULT_OUTPUTS),
            _pair_target(out_dir, pair.fixed_name, pair.moving_name, args.lumir_submission, args.fp16),
        )
        for pair in pairs
    ]
    seen = {}
    for n, job in enumerate(jobs):
        if job.target in seen:
            raise ValueError(
                f"{args.pairs}: pairs {seen[job.target] + 1} and {n + 1} would both write {job.target.name} "
                f"({job.pair.fixed_name} <- {job.pair.moving_name})"
            )
        seen[job.target] = n
    return jobs


def _finished(job: _Job, args) -> bool:
    """True when every file the job writes is already there (files appear whole or not at all)."""
    from lumireg.client.registration import FILES

    if args.lumir_submission:
        return job.target.is_file()
    names = job.outputs + (("displacement_itk",) if args.field_format == "itk" else ())
    return all((job.target / FILES[name]).is_file() for name in names)


def _batch(args, client, requested: tuple[str, ...] | None) -> int:
    from tqdm import tqdm

    jobs = _batch_jobs(args, read_pairs(Path(args.pairs), Path(args.data_dir) if args.data_dir else None), requested)
    todo = [job for job in jobs if not _finished(job, args)]
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def one(job: _Job) -> None:
        result = client.register(
            job.pair.fixed,
            job.pair.moving,
            job.outputs,
            moving_labels=job.pair.moving_labels,
            precision=args.precision,
            field_format=args.field_format,
            **_parameters(args),
        )
        if args.lumir_submission:
            _save_submission(result, job.target, args.fp16)
        else:
            result.save(job.target)
        return qc_warnings(result.qc)

    failures, flagged, start = [], [], time.perf_counter()
    pool = ThreadPoolExecutor(args.concurrency)
    try:
        futures = {pool.submit(one, job): job for job in todo}
        for future in tqdm(as_completed(futures), total=len(futures), desc="register", unit="pair"):
            pair = futures[future].pair
            if future.exception() is not None:
                failures.append(f"{pair.fixed.name} <- {pair.moving.name}: {future.exception()}")
            else:
                flagged += [f"{pair.fixed.name} <- {pair.moving.name}: {w}" for w in future.result()]
    finally:  # on Ctrl-C the pairs in flight finish (their files whole), the queued ones are dropped
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - start
    done = len(todo) - len(failures)
    print(
        f"registered {done} pair(s) in {seconds:.1f} s ({done / seconds if seconds else 0:.2f} pairs/s); "
        f"{len(jobs) - len(todo)} already done; {len(failures)} failed; {len(flagged)} QC warning(s)"
    )
    for failure in failures:
        print(f"  failed: {failure}", file=sys.stderr)
    for warning in flagged:
        print(f"  warning: {warning}", file=sys.stderr)
    return EXIT_FAILURE if failures or (flagged and not args.allow_warnings) else EXIT_OK


def _requested_outputs(text: str | None) -> tuple[str, ...] | None:
    """``--outputs`` as a tuple (None when not given: the defaults); ``ValueError`` for an unknown name."""
    from lumireg.client.registration import RESULT_OUTPUTS

    if text is None:
        return None
    outputs = tuple(o.strip() for o in text.split(",") if o.strip())
    unknown = [o for o in outputs if o not in RESULT_OUTPUTS]
    if not outputs or unknown:
        raise ValueError(f"--outputs: choose among {', '.join(RESULT_OUTPUTS)} (got {text!r})")
    return outputs


def _credentials(args):
    """TLS files and the access key from the command line (or ``$LUMIREG_ACCESS_KEY``); ``ValueError`` if unreadable."""
    from lumireg.client.security import Credentials, read_access_key

    return Credentials(
        tls=getattr(args, "tls", False),
        tls_ca=getattr(args, "tls_ca", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        access_key=read_access_key(getattr(args, "access_key_file", None)),
    )


def add_security_arguments(parser) -> None:
    """``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--access-key-file`` (any client command)."""
    parser.add_argument("--tls", action="store_true", help="connect over TLS (implied by the --tls-* options)")
    parser.add_argument("--tls-ca", help="PEM CA certificate that signed the server's (default: the system's roots)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for a server with mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--access-key-file",
        help=f"file holding the server's access key (default: ${ACCESS_KEY_ENV} if set); never printed",
    )


def _check_output_folder(out: str) -> None:
    """``ValueError`` unless ``out`` is, or can be made as, a writable folder (checked before anything is sent)."""
    import os

    path = Path(out).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"-o {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"-o {out}: {existing} is not writable")


def _usage_error(args) -> str | None:
    if bool(args.pairs) == bool(args.fixed and args.moving) or (args.fixed and not args.moving):
        return "give FIXED MOVING, or --pairs PAIRS"
    if args.pairs and args.labels:
        return "--labels is for one pair; in batch mode the pairs file names each pair's labels"
    return None


def run(args: argparse.Namespace) -> int:
    """``lumireg register``; returns an exit code of :mod:`lumireg.contract` (one line on stderr when not 0)."""
    from tritonclient.utils import InferenceServerException

    from lumireg.client.registration import (
        AccessDenied,
        InputError,
        LumiregError,
        RegistrationClient,
        ServerUnavailable,
    )

    problem = _usage_error(args)
    if problem:
        print(f"lumireg register: {problem}", file=sys.stderr)
        return EXIT_USAGE
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm) if on_main_thread else None
    try:
        requested = _requested_outputs(args.outputs)
        _check_output_folder(args.out)
        with RegistrationClient(
            args.url,
            transport=args.transport,
            timeout=args.timeout,
            retry_seconds=args.retry_seconds,
            concurrency=args.concurrency,
            credentials=_credentials(args),
        ) as client:
            try:
                live = client.client.is_server_live(client_timeout=10)
            except InferenceServerException:
                live = False
            if not live:
                raise ServerUnavailable(
                    f"no lumireg server answers at {args.url}{client.unreachable_reason()}; "
                    "start one with `lumireg serve`"
                )
            refused = client.access_problem()
            if refused:
                raise AccessDenied(refused)
            return _batch(args, client, requested) if args.pairs else _single(args, client, requested)
    except ServerUnavailable as exc:
        print(f"lumireg register: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (AccessDenied, InputError, ValueError, FileNotFoundError) as exc:
        print(f"lumireg register: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LumiregError as exc:
        print(f"lumireg register: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("lumireg register: interrupted; files already written are whole, run again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def add_parser(sub) -> None:
    register = sub.add_parser(
        "register",
        help="register a fixed and a moving NIfTI image through the service",
        description=__doc__.split("\n\n")[0],
    )
    register.add_argument("fixed", nargs="?", help="fixed image (NIfTI, or a DICOM series: a folder or one file)")
    register.add_argument("moving", nargs="?", help="moving image (NIfTI, or a DICOM series: a folder or one file)")
    register.add_argument("-o", "--out", required=True, help="output folder")
    register.add_argument(
        "--labels",
        help="label map on the moving image's grid (NIfTI, or a DICOM SEG on the moving series): adds warped_labels "
        "to the default outputs",
    )
    register.add_argument(
        "--output-format",
        choices=("nifti", "dicom"),
        default="nifti",
        help="dicom: the warped image as a derived MR series and the labels as a SEG on a DICOM fixed series "
        "(fields stay NIfTI) (default: nifti)",
    )
    register.add_argument("--uid-root", help="with --output-format dicom: root of the new UIDs (default: 2.25.)")
    register.add_argument("--fixed-series", help="the Series Instance UID to read from a fixed folder of several")
    register.add_argument("--moving-series", help="the Series Instance UID to read from a moving folder of several")
    register.add_argument(
        "--outputs",
        help="comma-separated: displacement, inverse_displacement, warped, warped_labels, qc "
        f"(default: {','.join(DEFAULT_OUTPUTS)}, and warped_labels with labels)",
    )
    register.add_argument(
        "--url",
        default="localhost:8001",
        help="the server's gRPC host:port (default: localhost:8001); several as host:port,host:port,... or a DNS "
        "name with several addresses: pairs rotate over the servers that are up, a failed one is retried on another",
    )
    register.add_argument(
        "--transport",
        choices=("auto", "shm", "grpc"),
        default="auto",
        help="auto: shared memory on this host, gRPC payloads otherwise (default: auto)",
    )
    register.add_argument(
        "--precision",
        choices=("float16", "float32"),
        default="float16",
        help="displacement precision on the wire (default: float16; files are float32)",
    )
    register.add_argument(
        "--field-format",
        choices=("lumir", "itk"),
        default="lumir",
        help="itk: also write displacement_itk.nii.gz for antsApplyTransforms (default: lumir)",
    )
    register.add_argument(
        "--pairs",
        help="batch: a LUMIR dataset / evaluation JSON (entries may name a "
        "'moving_label') or a fixed,moving[,moving_labels] CSV",
    )
    register.add_argument(
        "--data-dir", help="batch: folder the pair paths are relative to (default: the file's folder)"
    )
    register.add_argument("--concurrency", type=int, default=2, help="batch: requests in flight (default: 2)")
    register.add_argument(
        "--lumir-submission",
        action="store_true",
        help="batch: write the challenge's disp_{fixedID}_{movingID}.nii.gz files",
    )
    register.add_argument("--fp16", action="store_true", help="with --lumir-submission: float16 .npz files")
    for name, parameter in PARAMETERS.items():  # the request parameters, as the contract defines them
        register.add_argument(
            f"--{name}",
            type=parameter.kind,
            choices=parameter.choices or range(parameter.low, parameter.high + 1),
            metavar=f"{{{parameter.allowed().replace(' ', '')}}}",
            help=f"{parameter.meaning} (default: the server's, {parameter.default})",
        )
    add_security_arguments(register)
    register.add_argument(
        "--allow-warnings",
        action="store_true",
        help="exit 0 even when a pair's QC report has warnings (they are still printed)",
    )
    register.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    register.add_argument(
        "--retry-seconds",
        type=float,
        default=60.0,
        help="how long to retry while the server is unavailable (default: 60)",
    )
    register.set_defaults(func=run)
