"""Refinement benchmark: the cost of one instance-optimisation step, and of a whole request with ``refine`` steps.

``lumireg bench refine`` measures, on one device at batch 1 on a held-out
synthetic pair:

- ``per_step_seconds``: one Adam step of :func:`lumireg.network.refine.refine`
  at half resolution (both directions integrated, both images warped, the
  similarity and its backward), per similarity; the difference of a run with
  ``n + k`` steps and one with ``n`` steps divided by ``k``, so the fixed costs
  (pooling, the before/after evaluation) cancel;
- ``request_seconds``: the service's computation in process
  (:func:`lumireg.service.pipeline.register_in_process`, the network in
  PyTorch, float16 field out) for each ``refine`` in ``--steps``, 0 included.

Median of ``--repeats`` runs after one warm-up; on a GPU every time is taken
after a synchronise. Results go to ``<out>/<device>/refine.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from lumireg.benchmarks.machine import cpu_model, header, shape_option, slug
from lumireg.contract import EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_USAGE, MAX_REFINE_STEPS


def _median_seconds(call, device, repeats: int) -> float:
    import torch

    def timed() -> float:
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up: Triton compiles, caches fill
    return statistics.median(timed() for _ in range(repeats))


def benchmark(device: str, steps: list[int], similarities: list[str], repeats: int, shape=None) -> dict:
    """Time refinement steps and refined requests; returns the result dict (see the module docstring)."""
    import torch

    from lumireg.contract import intensities_to_uint8
    from lumireg.export.onnx import VelocityGraph
    from lumireg.network import load_model
    from lumireg.network.refine import refine
    from lumireg.service.pipeline import register_in_process
    from lumireg.train.synthetic import evaluation_seeds, synthetic_pair

    target = torch.device(device)
    sample = synthetic_pair(evaluation_seeds(1)[0], shape=shape)
    fixed, moving = (intensities_to_uint8(sample[k].numpy())[None] for k in ("fixed", "moving"))
    model = load_model().to(target).eval()
    graph = VelocityGraph(model)

    def network(f, m):
        with torch.no_grad():
            return graph(f.to(target), m.to(target))

    images = [torch.from_numpy(image).to(target) for image in (fixed, moving)]
    velocity = network(*images)
    first, extra = 1, 2 if target.type == "cpu" else 20
    per_step = {}
    for similarity in similarities:
        short = _median_seconds(lambda s=similarity: refine(velocity, *images, first, s), target, repeats)
        long = _median_seconds(lambda s=similarity: refine(velocity, *images, first + extra, s), target, repeats)
        per_step[similarity] = max(long - short, 0.0) / extra
    request = {}
    for count in [0, *steps]:
        request[str(count)] = _median_seconds(
            lambda n=count: register_in_process(
                network, fixed, moving, ["displacement_fp16"], refine=n, device=device, steps=model.config.steps
            ),
            target,
            repeats,
        )
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else f"cpu {cpu_model()}"
    return {
        **header("refine", name),
        "shape": list(fixed.shape[2:]),
        "batch": 1,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "network": "PyTorch (export.onnx.VelocityGraph)",
        "per_step_seconds": per_step,
        "request_seconds": request,
    }


def add_arguments(parser) -> None:
    """``lumireg bench refine``'s options."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--steps", default="10,25,50", help="refine values of the request sweep (default: 10,25,50)")
    parser.add_argument("--similarities", default="ncc,mi", help="similarities timed per step (default: ncc,mi)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per figure, median (default: 1)")
    parser.add_argument("--shape", help="volume D,H,W (default: LUMIR's canvas 160,224,192)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results, one per device")


def run(args) -> int:
    """``lumireg bench refine``: EXIT_OK; EXIT_USAGE for bad options; EXIT_MISSING_DEPENDENCY: no GPU for cuda."""
    import torch

    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
        similarities = [s.strip() for s in args.similarities.split(",") if s.strip()]
        shape = shape_option(args.shape)
        if not all(0 < s <= MAX_REFINE_STEPS for s in steps) or not set(similarities) <= {"ncc", "mi"}:
            raise ValueError(f"need --steps in 1..{MAX_REFINE_STEPS} and --similarities from ncc,mi")
        if args.repeats < 1:
            raise ValueError("need --repeats >= 1")
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"lumireg bench refine: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if device.type == "cuda" and not torch.cuda.is_available():
        print("lumireg bench refine: --device cuda but torch sees no GPU", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    result = benchmark(str(device), steps, similarities, args.repeats, shape)
    out = Path(args.out) / slug(result["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "refine.json").write_text(json.dumps(result, indent=1) + "\n")
    for similarity, seconds in result["per_step_seconds"].items():
        print(f"one refinement step, {similarity}: {seconds:.4f} s")
    for count, seconds in result["request_seconds"].items():
        print(f"request with refine={count}: {seconds:.3f} s")
    print(f"wrote {out / 'refine.json'}")
    return EXIT_OK
