"""What the ``lumireg`` model does around the network: the cascade of passes, integrate, warp, the QC report.

The same functions run inside the server (:mod:`lumireg.service.registration_model`)
and in process (:func:`register_in_process`: the reference the service is
tested against and the baseline the service benchmark compares with). On CUDA
tensors the work runs in our Triton kernels, on CPU tensors in their PyTorch
twins (:mod:`lumireg.kernels` picks).

Conventions: images ``uint8 (B, 1, 160, 224, 192)`` (LUMIR intensities);
displacements ``float32 (B, 3, D, H, W)`` in voxels, pull-back from the fixed
grid, channel c along array axis c (``README``, "Conventions").
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lumireg.contract import (
    CHECKPOINT_FILE,
    DEFAULT_COARSE,
    DEFAULT_CONTRAST,
    DEFAULT_PASSES,
    INTEGRATION_STEPS,
    OUTPUT_NAMES,
)
from lumireg.kernels import warp
from lumireg.network.align import compose_inverse, resample_half
from lumireg.network.align import estimate as estimate_alignment
from lumireg.network.align import resample as resample_aligned
from lumireg.network.cascade import cascade, cascade_inverse, halve, resample_like
from lumireg.network.contrast import apply_map, decide, intensity_map
from lumireg.network.refine import refine as refine_velocity
from lumireg.service.quality import quality_report, with_alignment


def exact_float32() -> None:
    """Turn TF32 off in this process, for cuDNN's convolutions (on by default) and CUDA matrix products.

    TF32 rounds the network's inputs to 10 mantissa bits; the velocities, and
    the fields integrated from them, would then move by more than the 2e-3
    voxels the served-vs-in-process tests promise. Both python-backend models
    call this in ``initialize`` (:func:`lumireg.service.backend.use_instance_device`),
    and :func:`network_runner` and :func:`register_in_process` call it in process,
    so the service and its in-process reference compute alike, in float32.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class StageTimer:
    """Seconds spent per stage, accumulated; waits for the GPU at each stage's end so times are real."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, device: torch.device):
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


class Transform(NamedTuple):
    """:func:`transform`'s result for a batch of B pairs.

    Attributes:
        displacement: ``(B, 3, D, H, W)`` float32 voxels, pull-back from the fixed grid (the whole transform).
        velocities: the passes' velocities (:func:`lumireg.network.cascade.cascade`), for :func:`postprocess`'s
            inverse.
        refinement: the refinement's report per pair; None when ``refine`` was 0.
        alignment: the alignment's report per pair (:func:`lumireg.network.align.estimate`; its matrix makes the
            inverse, its fields go into the QC report); None when ``align`` was ``"none"``.
        coarse: how many of ``velocities`` (the first) are coarse passes.
        contrast: per pair, the contrast handling asked for and run (:func:`lumireg.network.contrast.decide`).
    """

    displacement: torch.Tensor
    velocities: list
    refinement: list[dict] | None
    alignment: list[dict] | None
    coarse: int = 0
    contrast: list[dict] | None = None


def transform(
    network,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    passes: int = 1,
    *,
    coarse: int = 0,
    refine: int = 0,
    similarity: str = "ncc",
    align: str = "none",
    contrast: str = DEFAULT_CONTRAST,
    steps: int = INTEGRATION_STEPS,
    timer: StageTimer | None = None,
) -> Transform:
    """The network's transform of a batch: ``passes`` passes, composed, the last one refined ``refine`` steps.

    Args:
        network: ``(fixed, moving) -> velocity`` on uint8 ``(B, 1, D, H, W)`` tensors (the BLS call
            to ``lumireg_network``, or :func:`network_runner`); returns ``(B, 3, D/2, H/2, W/2)``.
        fixed, moving: ``uint8 (B, 1, D, H, W)``, one device.
        passes: full-resolution network passes (:func:`lumireg.network.cascade.cascade`).
        coarse: 1 for a pass on the pair at half resolution first (:func:`lumireg.network.cascade.coarse_pass`).
        refine: instance optimisation steps on the last pass's velocity (:func:`lumireg.network.refine.refine`).
        similarity: refinement's similarity, ``"ncc"`` or ``"mi"``; the alignment's too (local NCC or MI).
        align: ``"none"``, or ``"rigid"`` / ``"affine"``: the moving image is first aligned to the fixed one
            (:func:`lumireg.network.align.estimate`), the first pass runs on the aligned pair (a coarse pass on
            the moving image halved, then aligned: :func:`lumireg.network.align.resample_half`), each later one on
            the moving image resampled once through the affine and the passes before it, and the displacement
            returned is the whole transform (the network's, then the affine).
        contrast: ``"same"``, or ``"other"`` for images of different contrasts: the network sees the
            moving image mapped to the fixed image's contrast (:func:`contrast_map`); ``"auto"``: ``"other"``
            for the pairs :func:`lumireg.network.contrast.decide` finds of two contrasts (after the alignment).
        timer: collects seconds in ``network`` (the network's calls), ``refine``, ``align`` and ``integrate``
            (the rest).

    Returns:
        A :class:`Transform` on ``fixed``'s device.
    """
    timer = timer or StageTimer()
    device = fixed.device
    reports = []

    def timed_network(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        with timer.stage("network", device):
            return network(f, m).to(device)

    def timed_refine(f: torch.Tensor, m: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        with timer.stage("refine", device):
            velocity, report = refine_velocity(velocity, f, m, refine, similarity, steps=steps)
        reports.extend(report)
        return velocity

    matrix, alignment, aligned = None, None, None
    if align != "none":
        with timer.stage("align", device):
            matrix, alignment = estimate_alignment(fixed, moving, align, similarity)
            # what the first pass sees of the aligned image: a coarse pass only its halves (an eighth of the cost)
            aligned = (resample_half if coarse else resample_aligned)(moving, matrix)
    start, before = time.perf_counter(), sum(timer.seconds.get(name, 0.0) for name in ("network", "refine"))
    first = moving if aligned is None else aligned  # what the first pass sees
    decisions = decide(fixed if first.shape == fixed.shape else halve(fixed), first, contrast)
    other = [b for b, decision in enumerate(decisions) if decision["used"] == "other"]
    if other:
        if first.shape != fixed.shape:  # the contrast map runs the network on the whole aligned pair
            with timer.stage("align", device):
                aligned = first = resample_aligned(moving, matrix)
        # the map is estimated on the aligned pair and applied to the image each pass resamples
        tables = contrast_map(timed_network, fixed[other], first[other], steps)

        def mapped(image: torch.Tensor) -> torch.Tensor:
            image = image.clone()
            image[other] = apply_map(tables, image[other])
            return image

        moving = mapped(moving)
        aligned = None if aligned is None else mapped(aligned)
    displacement, velocities = cascade(
        timed_network,
        fixed,
        moving,
        passes,
        steps,
        refine_last=timed_refine if refine else None,
        coarse=coarse,
        matrix=matrix,
        aligned=aligned,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    inside = sum(timer.seconds.get(name, 0.0) for name in ("network", "refine")) - before
    timer.add("integrate", time.perf_counter() - start - inside)
    return Transform(displacement, velocities, reports or None, alignment, coarse, decisions)


def contrast_map(network, fixed: torch.Tensor, moving: torch.Tensor, steps: int = INTEGRATION_STEPS) -> torch.Tensor:
    """The look-up tables (``(B, 256)`` uint8, :func:`lumireg.network.contrast.apply_map`) that take ``moving``
    (``uint8 (B, 1, D, H, W)``) to the fixed image's contrast, for the network to register.

    Guimond's adaptive intensity correction in two rounds: the map of
    :func:`lumireg.network.contrast.intensity_map` estimated on the pair as it
    comes, then again on the pair after one network pass on the mapped image,
    when the joint histogram pairs up tissues far better.
    """
    mapped = apply_map(intensity_map(fixed, moving), moving)
    first, _ = cascade(network, fixed, mapped, 1, steps)
    return intensity_map(fixed, resample_like(moving, first))


def postprocess(
    displacement: torch.Tensor,
    velocities: list,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    wanted,
    *,
    moving_labels: torch.Tensor | None = None,
    refinement: list[dict] | None = None,
    alignment: list[dict] | None = None,
    contrast: list[dict] | None = None,
    coarse: int = 0,
    steps: int = INTEGRATION_STEPS,
    model: str = "lumireg",
    timer: StageTimer | None = None,
) -> dict:
    """The requested outputs of the ``lumireg`` model for a batch of pairs.

    Args:
        displacement: ``(B, 3, D, H, W)`` float32 pull-back displacement in voxels (:func:`transform`).
        velocities: the passes' velocities (:func:`lumireg.network.cascade.cascade`), for the inverse.
        fixed, moving: ``uint8 (B, 1, D, H, W)`` on the displacement's device.
        wanted: output names (:data:`lumireg.contract.OUTPUT_NAMES`).
        moving_labels: ``int32 (B, 1, D, H, W)``; needed for ``warped_labels``.
        refinement: :func:`transform`'s refinement reports for these pairs, for the QC report (None: none ran).
        alignment: :func:`transform`'s alignment reports for these pairs (None: none ran): their matrices make
            the inverse (the affine's inverse, then the passes'), their fields go into the QC report.
        contrast: :func:`transform`'s contrast decisions for these pairs (:attr:`Transform.contrast`), reported in
            the QC as ``contrast``.
        coarse: how many of ``velocities`` are coarse passes (:attr:`Transform.coarse`), for the QC report.
        steps: scaling-and-squaring steps (the network's).
        model: the weights' name for the QC report.
        timer: collects seconds per stage (``integrate``, ``warp``, ``qc``).

    Returns:
        ``{name: tensor}`` on the input device, shapes as in the contract, and
        ``"qc"`` as a list of B JSON strings.
    """
    wanted = set(wanted)
    unknown = wanted - set(OUTPUT_NAMES)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; the model has {list(OUTPUT_NAMES)}")
    if "warped_labels" in wanted and moving_labels is None:
        raise ValueError("output 'warped_labels' needs the input 'moving_labels'")
    timer = timer or StageTimer()
    device = displacement.device
    out = {}
    if "inverse_displacement" in wanted:
        with timer.stage("integrate", device):
            inverse = cascade_inverse(velocities, steps)
            if alignment:
                inverse = compose_inverse(_matrices(alignment, device), inverse)
            out["inverse_displacement"] = inverse
    with timer.stage("warp", device):  # the float16 cast too: the timer waits for it, and Triton reads its memory
        if "displacement_fp16" in wanted:
            out["displacement_fp16"] = displacement.half()
        if "warped" in wanted or "qc" in wanted:
            warped = warp(moving.float(), displacement)
            if "warped" in wanted:
                out["warped"] = warped
        if "warped_labels" in wanted:
            out["warped_labels"] = warp(moving_labels, displacement, mode="nearest").to(torch.int32)
    if "displacement" in wanted:
        out["displacement"] = displacement
    if "qc" in wanted:
        with timer.stage("qc", device):
            passes = len(velocities) - coarse
            reports = quality_report(
                fixed, moving, warped, displacement, model, passes, coarse=coarse, refinement=refinement
            )
            if alignment:
                reports = [with_alignment(report, a) for report, a in zip(reports, alignment)]
            if contrast:
                reports = [{**report, "contrast": c} for report, c in zip(reports, contrast)]
            out["qc"] = [json.dumps(report) for report in reports]
    return out


def _matrices(alignment: list[dict], device: torch.device) -> torch.Tensor:
    """The alignment reports' ``(B, 4, 4)`` pull-back matrices (canvas voxels), float64."""
    return torch.tensor([a["matrix_voxels"] for a in alignment], dtype=torch.float64, device=device)


def network_runner(onnx_path: str | Path, device: torch.device):
    """The network as the embedded server's ``lumireg_network`` runs it: ``(fixed, moving) -> velocity``.

    Takes ``uint8 (B, 1, D, H, W)`` tensors on any device, returns the float32
    velocity on ``device``. ONNX Runtime on a CPU, and on a GPU when
    onnxruntime-gpu is installed; otherwise on a GPU, PyTorch with the
    checkpoint that ``lumireg export`` copied beside the ONNX file. TF32 off (:func:`exact_float32`).
    """
    import onnxruntime

    from lumireg.export.onnx import VelocityGraph, onnxruntime_runner, onnxruntime_session
    from lumireg.network.checkpoint import load_model

    exact_float32()
    onnx_path = Path(onnx_path)
    if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        graph = VelocityGraph(load_model(onnx_path.parent / CHECKPOINT_FILE)).to(device)

        def run_torch(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return graph(fixed.to(device), moving.to(device))

        return run_torch
    run = onnxruntime_runner(onnxruntime_session(onnx_path, device.type, device.index or 0))

    def run_onnxruntime(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run(fixed.cpu().contiguous().numpy(), moving.cpu().contiguous().numpy())).to(device)

    return run_onnxruntime


def register_in_process(
    network,
    fixed: np.ndarray,
    moving: np.ndarray,
    wanted,
    *,
    passes: int = DEFAULT_PASSES,
    coarse: int = DEFAULT_COARSE,
    refine: int = 0,
    similarity: str = "ncc",
    contrast: str = DEFAULT_CONTRAST,
    align: str = "none",
    moving_labels: np.ndarray | None = None,
    device: str = "cpu",
    steps: int = INTEGRATION_STEPS,
    model: str = "lumireg",
    timer: StageTimer | None = None,
) -> dict:
    """The service's computation without the service: numpy in, :func:`postprocess`'s dict out.

    Args:
        network: ``(fixed, moving) -> velocity`` on uint8 tensors (:func:`network_runner`).
        fixed, moving: ``uint8 (B, 1, D, H, W)``.
        passes, coarse, refine, similarity, align, contrast: the request parameters of those names.
        moving_labels: ``int32 (B, 1, D, H, W)`` or None.
        device: where the post-processing runs (TF32 off: :func:`exact_float32`).
    """
    exact_float32()
    timer = timer or StageTimer()
    target = torch.device(device)

    def as_tensor(array):
        return None if array is None else torch.as_tensor(array, device=target)

    fixed, moving = as_tensor(fixed), as_tensor(moving)
    found = transform(
        network,
        fixed,
        moving,
        passes,
        coarse=coarse,
        refine=refine,
        similarity=similarity,
        contrast=contrast,
        align=align,
        steps=steps,
        timer=timer,
    )
    return postprocess(
        found.displacement,
        found.velocities,
        fixed,
        moving,
        wanted,
        moving_labels=as_tensor(moving_labels),
        refinement=found.refinement,
        alignment=found.alignment,
        contrast=found.contrast,
        coarse=found.coarse,
        steps=steps,
        model=model,
        timer=timer,
    )
