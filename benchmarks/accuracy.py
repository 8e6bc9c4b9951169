"""Accuracy benchmark: lumireg against no registration and ANTs SyN on two sets of held-out pairs.

``lumireg bench accuracy`` registers the pairs of each set with each method,
on this machine's CPU, and scores every resulting pull-back displacement with
the LUMIR metrics of ``lumireg.evaluate``: Dice and HD95 (voxels) over the
set's labels warped with nearest neighbour, NDV in % of the moving image's
nonzero voxels, SDlogJ, and seconds per pair. The sets (:data:`SETS`):

- ``synthetic``: the training generator's reserved evaluation seeds (never
  seen in training, but drawn from the very family the network learnt;
  labels: the template's 24 octant x tissue labels);
- ``independent``: :mod:`lumireg.benchmarks.independent_pairs`, a generator
  that shares no code with training (B-spline warps, another contrast model,
  54 tissue x 3 x 3 x 2 parcel labels), so a network cannot have learnt its
  family: the set to believe;
- ``contrast``: the same pairs with one image T2-like (cross-contrast, the
  LUMIR zero-shot task), for the refinement with mutual information.

Methods: ``none``, ``syn`` (antspyx), and lumireg with the request parameters
of :data:`REQUESTS` (the network alone, two passes, refinement with NCC or MI,
the contrast mapping for pairs of two contrasts, alone and refined with MI), and on the pose set
``lumireg-unposed``, its ceiling (:mod:`lumireg.benchmarks.pose`).

Each set's and method's rows go to ``<out>/<device>/accuracy-<method>.json``
(synthetic) or ``accuracy-<set>-<method>.json`` so a slow baseline (SyN takes
minutes per pair) runs once while lumireg is re-measured after every
training; each run then rebuilds ``accuracy.json`` (the table of every set and
method present) and ``accuracy.png`` (per set, one pair: images, lumireg's
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
from lumireg.contract import (
    EXIT_MISSING_DEPENDENCY,
    EXIT_OK,
    EXIT_USAGE,
    check_size_multiple,
    intensities_to_uint8,
)
from lumireg.evaluate import (
    as_channels_last,
    dice,
    hd95,
    jacobian_determinant,
    ndv_percent,
    sdlogj,
    warp_labels_nearest,
)

REFINE_STEPS = 20  # the refinement methods' default steps (--refine-steps)
# each lumireg method is a set of request parameters (lumireg.contract.PARAMETERS) the service would get;
# lumireg: the service's default (a coarse pass, then one full-resolution pass); lumireg-1pass: the full-resolution pass
# alone (coarse=0); the refine steps are filled in from --refine-steps; UNPOSED runs on the pose set only: the default
# request on the pair before posing, scored through the posed labels (lumireg.benchmarks.pose.world_anchored)
UNPOSED = "lumireg-unposed"
REQUESTS = {
    "lumireg": {"passes": 1},
    "lumireg-1pass": {"passes": 1, "coarse": 0},
    "lumireg-2passes": {"passes": 2},
    "lumireg-refine": {"passes": 1, "similarity": "ncc"},
    "lumireg-refine-mi": {"passes": 1, "similarity": "mi"},
    "lumireg-contrast": {"passes": 1, "contrast": "other"},
    "lumireg-contrast-refine-mi": {"passes": 1, "contrast": "other", "similarity": "mi"},
    UNPOSED: {"passes": 1},
}
METHODS = ("none", "syn", *REQUESTS)
CANVAS_ONLY_SETS = {"pose"}  # scanner-pose copies of canvas pairs (lumireg.benchmarks.pose): no --shape
METRICS = ("dice", "hd95", "tre", "ndv_percent", "sdlogj", "seconds")
SETS = {  # name -> where its pairs come from
    "synthetic": "held-out seeds of the training generator (lumireg.train.synthetic); 24 octant x tissue labels",
    "independent": "lumireg.benchmarks.independent_pairs (B-spline warps, tissue-mixture contrast, Rician noise; "
    "no code shared with training); 54 tissue x 3x3x2 parcel labels",
    "contrast": "the independent pairs with one image re-rendered T2-like (CSF bright, WM dark): fixed T1 and "
    "moving T2 for even indices, the reverse for odd ones; same labels",
    "pose": "the synthetic set's pairs with the moving image re-stored in scanner pose (lumireg.benchmarks.pose: "
    "10-30 degrees, 10-30 mm, 1x1x1.3 mm LPS voxels, 200x240x200 mm), registered through the client; same labels",
}


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
    for coordinate in grid:
        sampled = ants.apply_transforms(fixed_image, ants.from_numpy(coordinate), transforms, interpolator="linear")
        disp.append(sampled.numpy() - coordinate)
    return np.stack(disp).astype(np.float32)


def _network(model):
    """``(fixed, moving) -> velocity`` on uint8 tensors: the network in PyTorch as the service exports it."""
    import torch

    from lumireg.export.onnx import VelocityGraph

    graph = VelocityGraph(model)

    def network(f, m):
        with torch.no_grad():
            return graph(f, m)

    return network


def _register_lumireg(fixed: np.ndarray, moving: np.ndarray, model, request: dict) -> np.ndarray:
    """The network with the service's request parameters ``request``, as the server runs them
    (:func:`lumireg.service.pipeline.transform`)."""
    import torch

    from lumireg.service.pipeline import transform

    pair = [torch.from_numpy(intensities_to_uint8(image))[None, None] for image in (fixed, moving)]
    return transform(_network(model), *pair, **request, steps=model.config.steps).displacement[0].detach().numpy()


def _register_posed(method: str, pair: dict, model, request: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """One method on a pose-set pair (:func:`lumireg.benchmarks.pose.posed_pair`): warped labels and displacement."""
    from lumireg.benchmarks import pose

    if method == "none":
        return pose.register_none(pair)
    if method == "syn":
        return pose.register_syn(pair)
    # only the request's own parameters: the client adds align=affine for a scan not on LUMIR's canvas
    given = _given(method, request["refine"])
    return pose.register_lumireg(pair, pose.InProcessClient(_network(model), model.config.steps), given)


REGISTER = {"none": _register_none, "syn": _register_syn}


def _given(method: str, refine_steps: int) -> dict:
    """The request parameters lumireg method ``method`` sends, the refinement's steps filled in (unchecked)."""
    given = dict(REQUESTS[method])
    if "similarity" in given:
        given["refine"] = refine_steps
    return given


def _request(method: str, refine_steps: int) -> dict:
    """The request parameters of lumireg method ``method``, checked as the service checks them."""
    from lumireg.contract import request_parameters

    return request_parameters(_given(method, refine_steps))


def score(
    disp: np.ndarray, sample: dict, labels: list[int], warped: np.ndarray | None = None, posed: dict | None = None
) -> dict:
    """LUMIR metrics of a ``(3, D, H, W)`` voxel pull-back ``disp`` on one pair (a :func:`pair_set` sample),
    and the TRE at the template's landmarks (:func:`lumireg.benchmarks.landmarks.tre`).

    ``warped``: the moving labels already on the fixed grid (the pose set's methods warp them from the posed
    image themselves); None: the sample's moving labels warped through ``disp`` by nearest neighbour.
    ``posed``: the pose-set pair ``disp`` maps into (:func:`lumireg.benchmarks.pose.posed_pair`; ``disp`` is then
    world-anchored, and the TRE follows each mapped landmark back to the unposed moving image).
    """
    from lumireg.benchmarks.landmarks import tre
    from lumireg.benchmarks.pose import to_unposed

    field = as_channels_last(disp)
    fixed_labels = sample["fixed_labels"][0].numpy()
    moving_labels = sample["moving_labels"][0].numpy()
    if warped is None:
        warped = warp_labels_nearest(moving_labels, field)
    mask = sample["moving"][0].numpy() > 0
    return {
        "dice": float(np.nanmean(dice(fixed_labels, warped, labels, moving_labels))),
        "hd95": float(np.nanmean(hd95(fixed_labels, warped, labels, moving_labels))),
        "ndv_percent": float(ndv_percent(field, mask)),
        "sdlogj": float(sdlogj(field, mask)),
        "tre": tre(
            disp, sample["fixed_landmarks"], sample["moving_landmarks"], None if posed is None else to_unposed(posed)
        ),
    }


def _summary(rows: list[dict]) -> dict:
    return {
        m: {"mean": float(np.mean([r[m] for r in rows])), "std": float(np.std([r[m] for r in rows]))}
        for m in METRICS
        if all(m in r for r in rows)  # result files written before a metric existed lack it
    }


def _shown(sample: dict, disp: np.ndarray, posed: dict | None) -> tuple:
    """The figure's row for one pair: fixed, moving and lumireg's warped moving image on the fixed grid (0..1), and
    ``disp``; a pose-set pair (``posed``) shows its posed moving image placed by the world affines alone."""
    import torch

    from lumireg.benchmarks import pose
    from lumireg.kernels import warp

    fixed = sample["fixed"][0].numpy()
    if posed is not None:
        zero = np.zeros_like(disp)
        return fixed, pose.on_fixed_grid(posed, "moving", zero), pose.on_fixed_grid(posed, "moving", disp), disp
    warped = warp(sample["moving"][None], torch.from_numpy(disp)[None])[0, 0].numpy()
    return fixed, sample["moving"][0].numpy(), warped, disp


def _figure(shown: dict, path: Path) -> None:
    """One row per set in ``shown`` (``{set: _shown(...)}``): images, lumireg's warped moving image, Jacobian."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, rows = plt.subplots(len(shown), 6, figsize=(18, 3.6 * len(shown)), dpi=100, squeeze=False)
    for axes, (set_name, (fixed, moving, warped, disp)) in zip(rows, shown.items()):
        jac = jacobian_determinant(as_channels_last(disp))
        k = fixed.shape[2] // 2  # an axial slice through the middle of the brain
        panels = [
            (f"{set_name}: fixed", fixed),
            ("moving", moving),
            ("lumireg: warped moving", warped),
            ("|fixed - moving|", np.abs(fixed - moving)),
            ("|fixed - warped|", np.abs(fixed - warped)),
        ]
        for ax, (title, image) in zip(axes, panels):
            ax.imshow(np.rot90(image[:, :, k]), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
        jacobian = axes[5].imshow(np.rot90(jac[:, :, k]), cmap="RdBu_r", vmin=0, vmax=2)
        axes[5].set_title("Jacobian determinant", fontsize=9)
        fig.colorbar(jacobian, ax=axes[5], fraction=0.046)
        for ax in axes:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _print_table(table: dict) -> None:
    """One table, a section per set: ``table`` is ``{set: {"methods": {method: entry}}}`` (a metric a result file
    predates shows as ``-``)."""
    columns = {"dice": ("Dice", 4), "hd95": ("HD95 vox", 4), "tre": ("TRE vox", 4), "ndv_percent": ("NDV %", 5)}
    columns |= {"sdlogj": ("SDlogJ", 4)}

    def cell(summary: dict, metric: str, places: int) -> str:
        if metric not in summary:
            return f"{'-':>{places + 11}}"
        return f"{summary[metric]['mean']:>{places + 3}.{places}f}±{summary[metric]['std']:<{places + 3}.{places}f}"

    print(
        f"{'set':<12} {'method':<27} {'pairs':>5} "
        + " ".join(f"{title:>{places + 11}}" for title, places in columns.values())
        + f" {'s/pair':>8}"
    )
    for set_name, entries in table.items():
        for method, entry in entries["methods"].items():
            s = entry["summary"]
            print(
                f"{set_name:<12} {method:<27} {entry['pairs']:>5} "
                + " ".join(cell(s, metric, places) for metric, (_, places) in columns.items())
                + f" {s['seconds']['mean']:>8.2f}"
            )


def set_labels(name: str) -> list[int]:
    """The label values scored on set ``name`` (:data:`SETS`), background excluded."""
    if name in ("synthetic", "pose"):
        from lumireg.train.canvas import LABELS
    elif name in ("independent", "contrast"):
        from lumireg.benchmarks.independent_pairs import LABELS
    else:
        raise ValueError(f"unknown set {name!r}; sets: {', '.join(SETS)}")
    return sorted(LABELS)


def pair_set(name: str, pairs: int, shape: tuple[int, int, int] | None = None) -> list:
    """``pairs`` loaders of the first pairs of set ``name`` (:data:`SETS`), each a no-argument callable.

    A loader returns a sample as ``lumireg.train.data`` defines it, as CPU
    tensors: ``"fixed"``, ``"moving"`` ``(1, D, H, W)`` float32 in 0..1;
    ``"fixed_labels"``, ``"moving_labels"`` ``(1, D, H, W)`` int32; ``"seed"``;
    and the template's landmarks in each image (:func:`lumireg.benchmarks.landmarks.pair_landmarks`):
    ``"fixed_landmarks"``, ``"moving_landmarks"`` ``(N, 3)`` numpy voxel positions.
    ``shape``: ``(D, H, W)`` voxels, ``None`` for LUMIR's 160 x 224 x 192 at 1 mm.
    """
    import torch

    from lumireg.benchmarks.independent_pairs import independent_pair
    from lumireg.benchmarks.landmarks import pair_landmarks
    from lumireg.train.data import evaluation_seeds, synthetic_pair

    set_labels(name)  # refuses an unknown set

    def load(index: int) -> dict:
        if name in ("synthetic", "pose"):
            sample = synthetic_pair(evaluation_seeds(pairs)[index], shape, fields=True)
        else:
            contrasts = ("t1", "t1") if name == "independent" else (("t1", "t2"), ("t2", "t1"))[index % 2]
            # the generator is numpy-only; the harness and its figure take tensors
            sample = {
                k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in independent_pair(index, shape, fields=True, contrasts=contrasts).items()
            }
        fields = [sample.pop(f"{image}_disp").numpy() for image in ("fixed", "moving")]
        return {**sample, **pair_landmarks(*fields)}

    return [lambda i=i: load(i) for i in range(pairs)]


def _result_file(set_name: str, method: str) -> str:
    # the synthetic set keeps the file names it had before there were two sets
    return f"accuracy-{method}.json" if set_name == "synthetic" else f"accuracy-{set_name}-{method}.json"


def benchmark(
    methods,
    pairs: int,
    out: Path,
    shape: tuple[int, int, int] | None = None,
    model=None,
    checkpoint: str | None = None,
    sets=tuple(SETS),
    refine_steps: int = REFINE_STEPS,
) -> dict:
    """Register ``pairs`` pairs of each of ``sets`` with each of ``methods``; write the results under ``out``.

    Args:
        methods: names from :data:`METHODS`.
        pairs: pairs per set (the first ``pairs`` of each: seeds ``EVAL_SEED_START + k``, indices ``k``).
        out: the device folder; gets ``accuracy-[<set>-]<method>.json`` per set and method run,
            ``accuracy.json`` (every set and method present there) and ``accuracy.png`` (when lumireg ran).
        shape: ``(D, H, W)`` voxels of the pairs; ``None``: LUMIR's canvas at 1 mm.
        model: the network, needed for method ``lumireg``; ``checkpoint``: its name in the results.
        sets: names from :data:`SETS`, in the order to run.
        refine_steps: the request parameter ``refine`` of the refinement methods.

    Returns:
        The ``accuracy.json`` content: header, ``units``, ``sets: {set: {"pairs_from", "labels", "methods":
        {method: {"pairs", "shape", "summary": {metric: {"mean", "std"}}, ...}}}}``.
    """
    from lumireg.benchmarks import pose

    requests = {name: _request(name, refine_steps) for name in REQUESTS}
    shown = {}
    for set_name in sets:
        labels, loaders = set_labels(set_name), pair_set(set_name, pairs, shape)
        rows = {method: [] for method in methods if method != UNPOSED or set_name == "pose"}
        for index, load in enumerate(tqdm(loaders, desc=set_name, unit="pair")):
            sample = load()  # once per pair: every method registers the same images
            fixed, moving = sample["fixed"][0].numpy(), sample["moving"][0].numpy()
            posed = pose.posed_pair(sample, index) if set_name == "pose" else None
            for method in rows:
                started, warped = time.perf_counter(), None
                if posed is not None and method == UNPOSED:
                    disp = pose.world_anchored(posed, _register_lumireg(fixed, moving, model, requests[method]))
                    warped = pose.on_fixed_grid(posed, "moving_labels", disp)
                elif posed is not None:
                    warped, disp = _register_posed(method, posed, model, requests.get(method))
                elif method in requests:
                    disp = _register_lumireg(fixed, moving, model, requests[method])
                else:
                    disp = REGISTER[method](fixed, moving, model)
                seconds = time.perf_counter() - started
                scores = score(disp, sample, labels, warped, posed)
                rows[method].append({"seed": int(sample["seed"]), **scores, "seconds": seconds})
                if method == "lumireg" and set_name not in shown:
                    shown[set_name] = _shown(sample, disp, posed)
        for method in rows:
            result = {
                **header("accuracy", f"cpu {cpu_model()}"),
                "set": set_name,
                "method": method,
                "checkpoint": str(checkpoint or "bundled default") if method.startswith("lumireg") else None,
                "request": requests.get(method),
                "shape": list(sample["fixed"].shape[1:]),
                "pairs": len(rows[method]),
                "summary": _summary(rows[method]),
                "rows": rows[method],
            }
            (out / _result_file(set_name, method)).write_text(json.dumps(result, indent=1) + "\n")
    table = {}
    for set_name in SETS:
        entries = {}
        for method in METHODS:
            path = out / _result_file(set_name, method)
            if path.exists():
                entry = json.loads(path.read_text())
                entry.setdefault("commit", entry.get("lumireg_commit"))  # files written before the common header
                entries[method] = {
                    k: entry.get(k)
                    for k in ("pairs", "shape", "summary", "device", "commit", "date", "checkpoint", "request")
                }
        if entries:
            table[set_name] = {"pairs_from": SETS[set_name], "labels": len(set_labels(set_name)), "methods": entries}
    units = {
        "dice": "fraction, mean over the set's labels",
        "hd95": "voxels (1 mm at the default shape)",
        "tre": "voxels (1 mm at the default shape): mean distance of the template's landmarks, mapped vs true",
        "ndv_percent": "% of moving mask",
        "sdlogj": "std of log Jacobian determinant",
        "seconds": "wall seconds per pair, this CPU",
    }
    summary = {**header("accuracy", f"cpu {cpu_model()}"), "units": units, "sets": table}
    (out / "accuracy.json").write_text(json.dumps(summary, indent=1) + "\n")
    if shown:
        _figure(shown, out / "accuracy.png")
    _print_table(table)
    print(f"\nwrote {out}/accuracy.json")
    return summary


def add_arguments(parser) -> None:
    """``lumireg bench accuracy``'s options."""
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.add_argument("--pairs", type=int, default=20, help="held-out pairs (default: 20)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"methods (default: {','.join(METHODS)})")
    parser.add_argument("--checkpoint", help="weights to score (default: the bundled weights)")
    parser.add_argument("--shape", help="volume size D,H,W in voxels (default: LUMIR's canvas, 160,224,192 at 1 mm)")
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for the results, a sub-folder per device (default: benchmarks/results)",
    )
    parser.add_argument(
        "--sets",
        help=f"pair sets (default: {','.join(SETS)}; with --shape, every set but pose, which is LUMIR's canvas only)",
    )
    parser.add_argument(
        "--refine-steps",
        type=int,
        default=REFINE_STEPS,
        help=f"request parameter refine of the lumireg-refine methods (default: {REFINE_STEPS})",
    )


def run(args) -> int:
    """``lumireg bench accuracy``: register ``args.pairs`` pairs of each of ``args.sets`` with ``args.methods``;
    EXIT_OK on success, EXIT_USAGE for bad options, EXIT_MISSING_DEPENDENCY for method ``syn`` without antspyx."""
    from lumireg.network import load_model

    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    # with --shape, the default leaves out the sets defined on LUMIR's canvas only
    default_sets = [name for name in SETS if not (args.shape and name in CANVAS_ONLY_SETS)]
    sets = [s.strip() for s in (getattr(args, "sets", None) or ",".join(default_sets)).split(",")]
    try:
        shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else None  # None: the 1 mm canvas
        if shape and set(sets) & CANVAS_ONLY_SETS:
            raise ValueError(f"set(s) {','.join(sorted(CANVAS_ONLY_SETS))}: LUMIR's canvas only, leave --shape out")
        if unknown or args.pairs < 1 or (shape and len(shape) != 3) or not set(sets) <= set(SETS):
            raise ValueError
        if shape and any(m.startswith("lumireg") for m in methods):
            check_size_multiple(shape, "--shape")
    except ValueError as exc:
        why = f"{exc}; " if str(exc) else ""
        print(
            f"lumireg bench accuracy: {why}need --methods from {','.join(METHODS)}, --sets from {','.join(SETS)}, "
            f"--pairs >= 1 and --shape D,H,W; got {args.methods!r}, {','.join(sets)!r}, {args.pairs}, "
            f"{args.shape!r}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        [_request(name, args.refine_steps) for name in REQUESTS]
    except ValueError as exc:
        print(f"lumireg bench accuracy: --refine-steps: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if "syn" in methods and find_spec("ants") is None:
        print(
            "lumireg bench accuracy: method syn (ANTs SyN) needs antspyx: pip install 'lumireg[bench]', "
            "or leave syn out of --methods",
            file=sys.stderr,
        )
        return EXIT_MISSING_DEPENDENCY
    try:
        model = load_model(args.checkpoint) if any(m.startswith("lumireg") for m in methods) else None
    except (FileNotFoundError, ValueError) as exc:
        print(f"lumireg bench accuracy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out) / slug(f"cpu {cpu_model()}")
    out.mkdir(parents=True, exist_ok=True)
    sets = tuple(dict.fromkeys(sets))
    benchmark(methods, args.pairs, out, shape, model, args.checkpoint, sets=sets, refine_steps=args.refine_steps)
    return EXIT_OK
