"""Accuracy benchmark: lumireg against no registration and ANTs SyN on held-out synthetic pairs.

``lumireg bench accuracy`` registers pairs made from the reserved evaluation
seeds (never seen in training; labels: the template's 24 tissue x region
labels) with each method, on this machine's CPU, and scores every resulting
pull-back displacement with the LUMIR metrics of ``lumireg.evaluate``: Dice
and HD95 (voxels) over the labels warped with nearest neighbour, NDV in % of
the moving image's nonzero voxels, SDlogJ, and seconds per pair.

Each method's rows go to ``<out>/<device>/accuracy-<method>.json`` so a slow
baseline (SyN takes minutes per pair) runs once while lumireg is re-measured
after every training; each run then rebuilds ``accuracy.json`` (the table of
every method present) and ``accuracy.png`` (one pair: images, lumireg's
warped image and its Jacobian determinant).
"""

from __future__ import annotations

import json
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lumireg.benchmarks.machine import cpu_model, header, slug
from lumireg.contract import EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_USAGE, check_size_multiple
from lumireg.evaluate import (
    as_channels_last,
    dice,
    hd95,
    jacobian_determinant,
    ndv_percent,
    sdlogj,
    warp_labels_nearest,
)

METHODS = ("none", "syn", "lumireg")
METRICS = ("dice", "hd95", "ndv_percent", "sdlogj", "seconds")


def _register_none(fixed: np.ndarray, moving: np.ndarray, model) -> np.ndarray:
    return np.zeros((3, *fixed.shape), np.float32)


def _register_syn(fixed: np.ndarray, moving: np.ndarray, model) -> np.ndarray:
    """ANTs SyN (antspyx defaults: affine then SyN) -> ``(3, D, H, W)`` voxel pull-back displacement.

    The images get unit spacing, zero origin and identity direction, so ANTs'
    physical points are our voxel indices; the composed transform is sampled
    by warping each index-coordinate map (linear interpolation of a linear
    function, exact inside the volume).
    """
    import ants

    fixed_image, moving_image = ants.from_numpy(fixed), ants.from_numpy(moving)
    transforms = ants.registration(fixed_image, moving_image, type_of_transform="SyN")["fwdtransforms"]
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in fixed.shape], indexing="ij")
    disp = []
    for axis, coordinate in enumerate(grid):
        sampled = ants.apply_transforms(fixed_image, ants.from_numpy(coordinate), transforms, interpolator="linear")
        disp.append(sampled.numpy() - coordinate)
    return np.stack(disp).astype(np.float32)


def _register_lumireg(fixed: np.ndarray, moving: np.ndarray, model) -> np.ndarray:
    import torch

    with torch.inference_mode():
        pair = [torch.from_numpy(image)[None, None] for image in (fixed, moving)]
        return model(*pair)[0].numpy()


REGISTER = {"none": _register_none, "syn": _register_syn, "lumireg": _register_lumireg}


def score(disp: np.ndarray, sample: dict, labels: list[int]) -> dict:
    """LUMIR metrics of a ``(3, D, H, W)`` voxel pull-back ``disp`` on one synthetic pair."""
    field = as_channels_last(disp)
    fixed_labels = sample["fixed_labels"][0].numpy()
    moving_labels = sample["moving_labels"][0].numpy()
    warped = warp_labels_nearest(moving_labels, field)
    mask = sample["moving"][0].numpy() > 0
    return {
        "dice": float(np.nanmean(dice(fixed_labels, warped, labels, moving_labels))),
        "hd95": float(np.nanmean(hd95(fixed_labels, warped, labels))),
        "ndv_percent": float(ndv_percent(field, mask)),
        "sdlogj": float(sdlogj(field, mask)),
    }


def _summary(rows: list[dict]) -> dict:
    return {m: {"mean": float(np.mean([r[m] for r in rows])), "std": float(np.std([r[m] for r in rows]))}
            for m in METRICS}


def _figure(sample: dict, disp: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lumireg.kernels import warp

    fixed, moving = sample["fixed"][0].numpy(), sample["moving"][0].numpy()
    warped = warp(sample["moving"][None], torch.from_numpy(disp)[None])[0, 0].numpy()
    jac = jacobian_determinant(as_channels_last(disp))
    k = fixed.shape[2] // 2  # an axial slice through the middle of the brain
    panels = [("fixed", fixed), ("moving", moving), ("lumireg: warped moving", warped),
              ("|fixed - moving|", np.abs(fixed - moving)), ("|fixed - warped|", np.abs(fixed - warped))]
    fig, axes = plt.subplots(1, 6, figsize=(18, 3.6), dpi=100)
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(np.rot90(image[:, :, k]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    shown = axes[5].imshow(np.rot90(jac[:, :, k]), cmap="RdBu_r", vmin=0, vmax=2)
    axes[5].set_title("Jacobian determinant", fontsize=9)
    fig.colorbar(shown, ax=axes[5], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _print_table(table: dict) -> None:
    print(f"{'method':<9} {'pairs':>5} {'Dice':>15} {'HD95 vox':>15} {'NDV %':>17} {'SDlogJ':>15} {'s/pair':>8}")
    for method, entry in table.items():
        s = entry["summary"]
        print(f"{method:<9} {entry['pairs']:>5} "
              + " ".join(f"{s[m]['mean']:>7.4f}±{s[m]['std']:<7.4f}" for m in ("dice", "hd95"))
              + f" {s['ndv_percent']['mean']:>8.5f}±{s['ndv_percent']['std']:<8.5f}"
              + f" {s['sdlogj']['mean']:>7.4f}±{s['sdlogj']['std']:<7.4f} {s['seconds']['mean']:>8.2f}")


def add_arguments(parser) -> None:
    """``lumireg bench accuracy``'s options."""
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.add_argument("--pairs", type=int, default=20, help="held-out pairs (default: 20)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"methods (default: {','.join(METHODS)})")
    parser.add_argument("--checkpoint", help="weights to score (default: the bundled weights)")
    parser.add_argument("--shape", help="volume size D,H,W in voxels (default: LUMIR's canvas, 160,224,192 at 1 mm)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="folder for the results, a sub-folder per device (default: benchmarks/results)")


def run(args) -> int:
    """``lumireg bench accuracy``: register ``args.pairs`` held-out pairs with ``args.methods``; EXIT_OK on success,
    EXIT_USAGE for bad options, EXIT_MISSING_DEPENDENCY for method ``syn`` without antspyx."""
    from lumireg.network import load_model
    from lumireg.train.data import LABELS, SyntheticPairs, evaluation_seeds

    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    try:
        shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else None  # None: the 1 mm canvas
        if unknown or args.pairs < 1 or (shape and len(shape) != 3):
            raise ValueError
        if shape and "lumireg" in methods:
            check_size_multiple(shape, "--shape")
    except ValueError as exc:
        why = f"{exc}; " if str(exc) else ""
        print(f"lumireg bench accuracy: {why}need --methods from {','.join(METHODS)}, --pairs >= 1 and --shape D,H,W; "
              f"got {args.methods!r}, {args.pairs}, {args.shape!r}", file=sys.stderr)
        return EXIT_USAGE
    if "syn" in methods and find_spec("ants") is None:
        print("lumireg bench accuracy: method syn (ANTs SyN) needs antspyx: pip install 'lumireg[bench]', "
              "or leave syn out of --methods", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    try:
        model = load_model(args.checkpoint) if "lumireg" in methods else None
    except (FileNotFoundError, ValueError) as exc:
        print(f"lumireg bench accuracy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out) / slug(f"cpu {cpu_model()}")
    out.mkdir(parents=True, exist_ok=True)
    pairs = SyntheticPairs(evaluation_seeds(args.pairs), shape=shape, split="eval", labels=True)
    labels = sorted(LABELS)
    shown = None
    for method in methods:
        rows = []
        for i in tqdm(range(len(pairs)), desc=method, unit="pair"):
            sample = pairs[i]
            fixed, moving = sample["fixed"][0].numpy(), sample["moving"][0].numpy()
            started = time.perf_counter()
            disp = REGISTER[method](fixed, moving, model)
            seconds = time.perf_counter() - started
            rows.append({"seed": int(sample["seed"]), **score(disp, sample, labels), "seconds": seconds})
            if method == "lumireg" and shown is None:
                shown = (sample, disp)
        result = {**header("accuracy", f"cpu {cpu_model()}"), "method": method,
                  "checkpoint": str(args.checkpoint or "bundled default") if method == "lumireg" else None,
                  "shape": list(sample["fixed"].shape[1:]), "pairs": len(rows), "summary": _summary(rows), "rows": rows}
        (out / f"accuracy-{method}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = {}
    for method in METHODS:
        path = out / f"accuracy-{method}.json"
        if path.exists():
            entry = json.loads(path.read_text())
            entry.setdefault("commit", entry.get("lumireg_commit"))  # files written before the common header
            table[method] = {k: entry.get(k) for k in ("pairs", "shape", "summary", "device", "commit", "date",
                                                       "checkpoint")}
    units = {"dice": "fraction, mean over the 24 labels", "hd95": "voxels (1 mm)", "ndv_percent": "% of moving mask",
             "sdlogj": "std of log Jacobian determinant", "seconds": "wall seconds per pair, this CPU"}
    summary = {**header("accuracy", f"cpu {cpu_model()}"), "units": units, "methods": table}
    (out / "accuracy.json").write_text(json.dumps(summary, indent=1) + "\n")
    if shown is not None:
        _figure(*shown, out / "accuracy.png")
    _print_table(table)
    print(f"\nwrote {out}/accuracy.json")
    return EXIT_OK
