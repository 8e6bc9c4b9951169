"""The evaluation runner: displacement files + LUMIR ground truth + config(s) -> metrics JSON.

Mirrors the official LUMIR evaluator (``L2R_LUMIR_Eval/evaluation.py`` in
JHU-MedImage-Reg/LUMIR_L2R), ``lumireg evaluate -i DISP_DIR -d GT_DIR -c
CONFIG.json [-c CONFIG2.json ...] -o metrics.json``:

- ``DISP_DIR/disp_{fixedID}_{movingID}.nii.gz`` (float32) or ``.npz`` (array
  ``arr_0``, e.g. float16, which NIfTI cannot hold; preferred when both exist,
  as the official): ``[D, H, W, 3]`` (or ``[3, D, H, W]``, transposed as the
  official does when the first axis is 3), voxel units, pull-back from the
  fixed grid; read as float64. When the two modality numbers differ (and are
  not 0000 -> 0001) the name is ``disp_{fixedID}_{fixedMod}_{movingID}_{movingMod}``.
- ``GT_DIR``: the pair paths of the config relative to it (``./imagesVal/
  LUMIRMRI_3455_0000.nii.gz``); labels under ``labelsVal/``, landmarks under
  ``{dest}Val/`` (``dest`` "landmarks", or "landmarksVal"), same file names.
- The config (LUMIR's ``LUMIR_VAL_*_evaluation_config.json``): ``name``,
  ``expected_shape`` ``[D, H, W, 3]``, ``eval_pairs`` ``[{"fixed", "moving"}]``,
  ``evaluation_methods`` ``[{"name", "metric", "labels"?, "dest"?}]`` with
  metric ``dice``/``hd95`` (need ``labels``), ``tre`` (needs ``dest``), ``ndv``,
  ``sdlogj``. ``masked_evaluation: true`` is refused.

The output: ``{"name", "aggregates", "cases", "evaluator"}``. ``cases`` maps
``"{fixedID}_{fixedMod}<--{movingID}_{movingMod}"`` to ``{method name: {"mean",
"detailed"}}``; ``detailed`` is ``{label: value}`` for dice, hd95 and tre (the
official writes a list in config order, and one number for tre) and the same
number as ``mean`` for ndv and sdlogj. A case in several configs holds the
methods of all of them (the official keeps only the last config's).
``aggregates`` maps each method name to ``mean``, ``std`` (ddof 0) and ``"30"``:
``np.quantile(..., 0.3)`` of the per-case means, for every metric alike, as the
official: the worst-30 % threshold for Dice, the best-30 % one for HD95, TRE
and NDV. NaN propagates into the aggregates as in the official; NaN and
infinities are written as ``null``.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from lumireg import __version__
from lumireg.contract import EXIT_OK, EXIT_USAGE, lumir_case_names
from lumireg.evaluate import metrics

METRICS = ("dice", "hd95", "tre", "ndv", "sdlogj")


class EvaluationError(ValueError):
    """A missing or malformed input; the message starts with the offending path."""


def _fail(path, message: str):
    raise EvaluationError(f"{path}: {message}")


def _check_method(path, m) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("name"), str) or m.get("metric") not in METRICS:
        _fail(path, f"each evaluation method needs a 'name' and a 'metric' in {METRICS}, got {m!r}")
    labels = m.get("labels")
    if (m["metric"] in ("dice", "hd95") or labels is not None) and not (
        isinstance(labels, list) and all(isinstance(v, int) and v >= 0 for v in labels)
    ):
        _fail(path, f"method {m['name']!r} needs 'labels': a list of non-negative integers")
    if m["metric"] == "tre" and not isinstance(m.get("dest"), str):
        _fail(path, f"method {m['name']!r} (tre) needs 'dest', the landmark folder, e.g. \"landmarks\"")
    return m


def _check_pair(path, p) -> dict:
    names = [p.get(side) if isinstance(p, dict) else None for side in ("fixed", "moving")]
    found = lumir_case_names(*names)
    if found is None:
        _fail(path, f"each eval pair needs 'fixed' and 'moving' image paths ending in _XXXX_YYYY.nii.gz, got {p!r}")
    return {"fixed": names[0], "moving": names[1], "key": found[0], "disp": found[1]}


def load_config(path) -> dict:
    """Read and check one evaluation config; raises :class:`EvaluationError` naming ``path``.

    Returns:
        ``{"name": str, "expected_shape": (D, H, W, 3), "pairs": [{"fixed",
        "moving", "key", "disp"}], "methods": [method dicts]}``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        _fail(path, "config file not found")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        _fail(path, f"cannot read the config as JSON ({exc})")
    if not isinstance(data, dict):
        _fail(path, "the config must be a JSON object")
    shape = data.get("expected_shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(n, int) and n > 0 for n in shape)
        and shape[3] == 3
    ):
        _fail(path, f"'expected_shape' must be [D, H, W, 3], got {shape!r}")
    pairs, methods = data.get("eval_pairs"), data.get("evaluation_methods")
    if not isinstance(pairs, list) or not pairs:
        _fail(path, '\'eval_pairs\' must be a non-empty list of {"fixed", "moving"}')
    if not isinstance(methods, list) or not methods:
        _fail(path, "'evaluation_methods' must be a non-empty list")
    if data.get("masked_evaluation"):
        _fail(path, "'masked_evaluation': true is not supported")
    return {
        "name": str(data.get("name", Path(path).stem)),
        "expected_shape": tuple(shape),
        "pairs": [_check_pair(path, p) for p in pairs],
        "methods": [_check_method(path, m) for m in methods],
    }


def _gt_file(gt_dir: Path, image: str, folder: str) -> Path:
    """``imagesVal/X.nii.gz`` -> ``{folder}Val/X.nii.gz`` under ``gt_dir`` (``folder`` may carry the suffix)."""
    rel = Path(image)
    suffix = rel.parent.name.removeprefix("images")
    return gt_dir / rel.parent.parent / (folder if folder.endswith(suffix) else folder + suffix) / rel.name


def _needed(gt_dir: Path, pair: dict, method: dict) -> list[Path]:
    metric = method["metric"]
    if metric in ("dice", "hd95"):
        return [_gt_file(gt_dir, pair[s], "labels") for s in ("fixed", "moving")]
    if metric == "tre":
        return [_gt_file(gt_dir, pair[s], method["dest"]) for s in ("fixed", "moving")]
    return [gt_dir / pair["moving"]] if metric == "ndv" else []


def _header_shape(path: Path, what: str) -> tuple:
    if not path.is_file():
        _fail(path, f"{what} missing")
    try:
        return nib.load(path).shape
    except Exception as exc:  # nibabel raises several types for a file that is not NIfTI
        _fail(path, f"cannot read {what} as NIfTI ({exc})")


def _disp_file(disp_dir: Path, stem: str) -> Path:
    npz = disp_dir / f"{stem}.npz"
    return npz if npz.is_file() else disp_dir / f"{stem}.nii.gz"


def _check_disp_shape(path: Path, got: tuple, shape: tuple) -> None:
    if got != shape and got != (3,) + shape[:3]:
        _fail(path, f"displacement field has shape {got}, expected {shape}")


def load_disp(path: Path, shape: tuple) -> np.ndarray:
    """A displacement file as ``[D, H, W, 3]`` float64, checked against ``shape`` (the config's expected_shape)."""
    if path.suffix == ".npz":
        try:
            with np.load(path) as npz:
                disp = npz["arr_0"].astype(np.float64)
        except (OSError, KeyError, ValueError) as exc:
            _fail(path, f"cannot read the displacement field 'arr_0' ({exc})")
    else:
        disp = nib.load(path).get_fdata()
    _check_disp_shape(path, disp.shape, shape)
    return disp.transpose(1, 2, 3, 0) if disp.shape[0] == 3 else disp


def _check_files(disp_dir: Path, gt_dir: Path, cases: dict) -> None:
    """Every file exists and its header shape fits, before any metric runs (headers only: cheap; .npz at load)."""
    for case in cases.values():
        shape, disp = case["shape"], _disp_file(disp_dir, case["pair"]["disp"])
        if not disp.is_file():
            _fail(disp, "displacement field missing (nor is there a .npz)")
        if disp.suffix != ".npz":
            _check_disp_shape(disp, _header_shape(disp, "displacement field"), shape)
        for path in sorted({p for m in case["methods"].values() for p in _needed(gt_dir, case["pair"], m)}):
            got = _header_shape(path, "ground-truth file")
            if got[:3] != shape[:3] or len(got) != 3:
                _fail(path, f"ground-truth volume has shape {got}, expected {shape[:3]}")


def _volume(path: Path) -> np.ndarray:
    """A ground-truth volume as the official reads it: float64 ``get_fdata()``."""
    return nib.load(path).get_fdata()


def _per_label(values: np.ndarray, labels: list, mean) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN is NaN, as wanted
        return {"mean": float(mean(values)), "detailed": {str(v): float(x) for v, x in zip(labels, values)}}


def evaluate_case(disp: np.ndarray, gt_dir: Path, pair: dict, methods: list[dict]) -> dict:
    """All methods for one pair and its ``[D, H, W, 3]`` field: ``{method name: {"mean", "detailed"}}``."""
    out, seg = {}, None
    for m in methods:
        metric = m["metric"]
        if metric in ("dice", "hd95"):
            if seg is None:
                fixed, moving = (_volume(p) for p in _needed(gt_dir, pair, m))
                seg = fixed, moving, metrics.warp_labels_nearest(moving, disp)
            fn = metrics.dice if metric == "dice" else metrics.hd95
            out[m["name"]] = _per_label(fn(seg[0], seg[2], m["labels"], moving_labels=seg[1]), m["labels"], np.nanmean)
        elif metric == "tre":
            fixed, moving = (_volume(p) for p in _needed(gt_dir, pair, m))
            labels = m.get("labels") or [int(v) for v in np.unique(fixed) if v != 0]
            warped = metrics.warp_labels_nearest(moving, disp)
            out[m["name"]] = _per_label(metrics.landmark_distances(fixed, warped, labels), labels, np.mean)
        else:
            value = (
                metrics.ndv_percent(disp, _volume(_needed(gt_dir, pair, m)[0]))
                if metric == "ndv"
                else metrics.sdlogj(disp)
            )
            out[m["name"]] = {"mean": value, "detailed": value}
    return out


def aggregate(cases: dict) -> dict:
    """Per method name: ``mean``, ``std`` and the 30 % quantile ``"30"`` of the case means (official rule)."""
    names = sorted({name for case in cases.values() for name in case})
    out = {}
    for name in names:
        values = np.array([case[name]["mean"] for case in cases.values() if name in case], dtype=np.float64)
        out[name] = {"mean": float(values.mean()), "std": float(values.std()), "30": float(np.quantile(values, 0.3))}
    return out


def evaluate(disp_dir, gt_dir, config_paths: list, progress: bool = True) -> dict:
    """Score every pair of every config; returns the report (see the module docstring).

    Every config, displacement file and ground-truth file is checked first, so
    a missing or misshapen one fails before any metric runs, with an
    :class:`EvaluationError` naming it.
    """
    disp_dir, gt_dir = Path(disp_dir), Path(gt_dir)
    configs = [load_config(p) for p in config_paths]
    cases: dict[str, dict] = {}
    for config in configs:
        for pair in config["pairs"]:
            case = cases.setdefault(pair["key"], {"pair": pair, "shape": config["expected_shape"], "methods": {}})
            case["methods"].update({m["name"]: m for m in config["methods"]})
    _check_files(disp_dir, gt_dir, cases)
    results = {}
    for key, case in tqdm(cases.items(), desc="evaluate", unit="case", disable=not progress):
        disp = load_disp(_disp_file(disp_dir, case["pair"]["disp"]), case["shape"])
        results[key] = evaluate_case(disp, gt_dir, case["pair"], list(case["methods"].values()))
    return {
        "name": configs[-1]["name"],
        "aggregates": aggregate(results),
        "cases": results,
        "evaluator": f"lumireg {__version__}",
    }


def _finite_or_none(obj):
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_report(report: dict, path) -> None:
    """Write the report as strict JSON (NaN and infinities as ``null``), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite_or_none(report), indent=4, allow_nan=False) + "\n")


def run(args) -> int:
    """``lumireg evaluate`` on ``args.input``, ``.data``, ``.config`` (a list), ``.output``, ``.quiet``.

    Returns ``EXIT_OK``, or ``EXIT_USAGE`` after printing the :class:`EvaluationError`
    (naming the path): the exit codes of :mod:`lumireg.contract`.
    """
    try:
        report = evaluate(args.input, args.data, args.config, progress=not args.quiet)
        write_report(report, args.output)
    except EvaluationError as exc:
        print(f"lumireg evaluate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name, agg in report["aggregates"].items():
        print(f"{name:<28} mean {agg['mean']:.4f}  std {agg['std']:.4f}  30% {agg['30']:.4f}")
    print(f"{len(report['cases'])} cases -> {args.output}")
    return EXIT_OK
