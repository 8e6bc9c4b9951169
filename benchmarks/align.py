"""Alignment benchmark: the cost and the accuracy of the affine pre-alignment stage (request parameter ``align``).

``lumireg bench align`` poses held-out synthetic brains as a scanner would
store them (a random rotation of 10..30 degrees about a random axis and a
random shift of 10..30 mm, seeded) and aligns each posed copy back onto its
original with :func:`lumireg.network.align.estimate`, at batch 1:

- ``seconds``: the stage's time per pair (median over poses) for each mode and
  similarity, the resampling of the moving image included, as the service's default
  request runs it (for its coarse pass: :func:`lumireg.network.align.resample_half`);
- ``corner_error_mm``: the mean distance between where the estimated and the
  true matrices send the 8 corners of the brain's bounding box (mean and max
  over poses; the known-transform test asks for under 1 mm);
- ``converged``: the share of poses reported converged.

On a GPU every time is taken after a synchronise. Results go to
``<out>/<device>/align.json``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from lumireg.benchmarks.machine import cpu_model, header, shape_option, slug
from lumireg.contract import EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_USAGE


def random_pose(generator, shape) -> list[list[float]]:
    """A ``(4, 4)`` pull-back matrix (voxels = mm): rotation of 10..30 degrees about a random axis through the
    volume's centre, then a shift of 10..30 mm in a random direction."""
    import torch

    axis = torch.randn(3, generator=generator, dtype=torch.float64)
    angle = math.radians(10 + 20 * float(torch.rand(1, generator=generator, dtype=torch.float64)))
    x, y, z = (axis / axis.norm() * angle).tolist()
    rotation = torch.linalg.matrix_exp(torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=torch.float64))
    direction = torch.randn(3, generator=generator, dtype=torch.float64)
    shift = direction / direction.norm() * (10 + 20 * float(torch.rand(1, generator=generator, dtype=torch.float64)))
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre + shift - rotation @ centre
    return matrix.tolist()


def corner_error_mm(found, true, image) -> float:
    """Mean distance (1 mm voxels) between where ``found`` and ``true`` ((4, 4)) send the brain box's 8 corners."""
    import torch

    inside = (image[0, 0] > 0).nonzero()
    low, high = inside.min(0).values.double().tolist(), inside.max(0).values.double().tolist()
    corners = torch.tensor(
        [
            [(low, high)[a][0], (low, high)[b][1], (low, high)[c][2], 1.0]
            for a in (0, 1)
            for b in (0, 1)
            for c in (0, 1)
        ],
        dtype=torch.float64,
    ).T
    return float((found.double().cpu() @ corners - true @ corners)[:3].norm(dim=0).mean())


def benchmark(device: str, poses: int, modes: list[str], similarities: list[str], shape=None) -> dict:
    """Align ``poses`` posed brains per mode and similarity; returns the result dict (see the module docstring)."""
    import torch

    from lumireg.contract import intensities_to_uint8
    from lumireg.network import align
    from lumireg.train.synthetic import evaluation_seeds, synthetic_pair

    target = torch.device(device)
    generator = torch.Generator().manual_seed(14)
    cases = []
    for seed in evaluation_seeds(poses):
        brain = torch.from_numpy(intensities_to_uint8(synthetic_pair(seed, shape=shape)["fixed"].numpy()))[None]
        brain = brain.to(target)
        pose = torch.tensor(random_pose(generator, brain.shape[2:]), dtype=torch.float64)
        cases.append((brain, align.resample(brain, pose[None].float().to(target)), torch.linalg.inv(pose)))

    def run_stage(fixed, moving, mode, similarity):
        matrix, reports = align.estimate(fixed, moving, mode, similarity)
        align.resample_half(moving, matrix)
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        return matrix, reports

    run_stage(*cases[0][:2], modes[0], similarities[0])  # warm-up: Triton compiles, caches fill
    results = {}
    for mode in modes:
        for similarity in similarities:
            seconds, errors, converged = [], [], []
            for fixed, moving, true in cases:
                start = time.perf_counter()
                matrix, (report,) = run_stage(fixed, moving, mode, similarity)
                seconds.append(time.perf_counter() - start)
                errors.append(corner_error_mm(matrix[0], true, fixed))
                converged.append(report["converged"])
            results[f"{mode}-{similarity}"] = {
                "seconds": statistics.median(seconds),
                "corner_error_mm": {"mean": statistics.fmean(errors), "max": max(errors)},
                "converged": sum(converged) / len(converged),
            }
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else f"cpu {cpu_model()}"
    return {
        **header("align", name),
        "shape": list(cases[0][0].shape[2:]),
        "batch": 1,
        "poses": poses,
        "pose": "rotation 10..30 degrees about a random axis, shift 10..30 mm (seeded)",
        "threads": torch.get_num_threads(),
        "levels": list(align.LEVELS),
        "iterations": list(align.ITERATIONS),
        "results": results,
    }


def add_arguments(parser) -> None:
    """``lumireg bench align``'s options."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--poses", type=int, default=4, help="posed brains per mode and similarity (default: 4)")
    parser.add_argument("--modes", default="rigid,affine", help="alignment modes (default: rigid,affine)")
    parser.add_argument("--similarities", default="ncc,mi", help="similarities (default: ncc,mi)")
    parser.add_argument("--shape", help="volume D,H,W (default: LUMIR's canvas 160,224,192)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results, one per device")


def run(args) -> int:
    """``lumireg bench align``: EXIT_OK; EXIT_USAGE for bad options; EXIT_MISSING_DEPENDENCY: no GPU for cuda."""
    import torch

    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        similarities = [s.strip() for s in args.similarities.split(",") if s.strip()]
        shape = shape_option(args.shape)
        if not modes or not set(modes) <= {"rigid", "affine"}:
            raise ValueError("need --modes from rigid,affine")
        if not similarities or not set(similarities) <= {"ncc", "mi"}:
            raise ValueError("need --similarities from ncc,mi")
        if args.poses < 1:
            raise ValueError("need --poses >= 1")
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"lumireg bench align: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if device.type == "cuda" and not torch.cuda.is_available():
        print("lumireg bench align: --device cuda but torch sees no GPU", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    result = benchmark(str(device), args.poses, modes, similarities, shape)
    out = Path(args.out) / slug(result["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "align.json").write_text(json.dumps(result, indent=1) + "\n")
    for name, row in result["results"].items():
        error = row["corner_error_mm"]
        print(
            f"{name}: {row['seconds']:.3f} s per pair, corners {error['mean']:.2f} mm mean "
            f"({error['max']:.2f} max), converged {row['converged']:.0%}"
        )
    print(f"wrote {out / 'align.json'}")
    return EXIT_OK
