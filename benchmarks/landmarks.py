"""Landmarks for target registration error (TRE) on generated pairs whose true transforms are known.

Both benchmark generators make each image by warping the template canvas with
a known pull-back displacement ``u`` (``image(x) = template(x + u(x))``). A
point ``p`` of the template therefore sits, in that image, at the ``x`` with
``x + u(x) = p`` (:func:`locate`: a fixed-point iteration). So every template
landmark has an exact position in the fixed and in the moving image, and a
method's pull-back displacement ``d`` (fixed grid -> moving grid) scores

    TRE = mean_k | x_f,k + d(x_f,k) - x_m,k |   (voxels; mm on LUMIR's 1 mm canvas),

with ``d`` sampled trilinearly at the fixed landmark: the distance between
where the method sends a fixed landmark and where that landmark really is in
the moving image. (The LUMIR evaluator measures the same thing on landmark
blobs warped by nearest neighbour, which adds rounding; points need none.)

The landmarks (:func:`template_landmarks`) are points a person could place
again on every brain: 3-D corners of the template's T1 image (the smallest
eigenvalue of the structure tensor, Rohr's and Förstner's detector, largest
first), at least :data:`MIN_SEPARATION_MM` apart, at least :data:`MARGIN_MM`
inside the brain mask. They depend on the template only, never on a pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage

from lumireg.contract import CANVAS

COUNT = 48  # landmarks per image
MIN_SEPARATION_MM = 12.0
MARGIN_MM = 6.0  # distance from the brain mask's edge
GRADIENT_SIGMA_MM, INTEGRATION_SIGMA_MM = 1.0, 2.5
LOCATE_ITERATIONS, LOCATE_TOLERANCE = 100, 1e-3  # voxels


@lru_cache(maxsize=1)
def template_landmarks(count: int = COUNT) -> np.ndarray:
    """``(count, 3)`` float64 landmark positions in canvas voxels (1 mm), strongest corner first."""
    from lumireg.train.canvas import lumir_canvas

    canvas = lumir_canvas()
    image = canvas.image.astype(np.float64) / 255
    gradient = [
        ndimage.gaussian_filter(image, GRADIENT_SIGMA_MM, order=[int(a == b) for b in range(3)]) for a in range(3)
    ]
    tensor = np.empty((*CANVAS, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            tensor[..., a, b] = tensor[..., b, a] = ndimage.gaussian_filter(
                gradient[a] * gradient[b], INTEGRATION_SIGMA_MM
            )
    del gradient
    inside = ndimage.distance_transform_edt(canvas.mask) >= MARGIN_MM
    response = np.zeros(CANVAS)
    response[inside] = np.linalg.eigvalsh(tensor[inside])[:, 0]
    del tensor
    peaks = (response == ndimage.maximum_filter(response, size=3)) & (response > 0)
    candidates = np.argwhere(peaks)
    candidates = candidates[np.argsort(-response[peaks], kind="stable")]
    chosen: list[np.ndarray] = []
    for point in candidates:
        if all(np.linalg.norm(point - other) >= MIN_SEPARATION_MM for other in chosen):
            chosen.append(point)
            if len(chosen) == count:
                break
    if len(chosen) < count:
        raise RuntimeError(f"the template has only {len(chosen)} landmarks {MIN_SEPARATION_MM} mm apart")
    return np.array(chosen, np.float64)


def on_grid(points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Canvas voxel positions -> voxel positions of a ``shape`` grid with the canvas's field of view
    (voxel centres matched, as both generators resample: ``(p + 0.5) * shape / CANVAS - 0.5``)."""
    scale = np.array(shape, np.float64) / np.array(CANVAS, np.float64)
    return (points + 0.5) * scale - 0.5


def sample(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(3, D, H, W)`` ``field`` at ``(N, 3)`` voxel ``points`` -> ``(N, 3)`` (trilinear, border values beyond)."""
    return np.stack([ndimage.map_coordinates(c, points.T, order=1, mode="nearest") for c in field], axis=1)


def locate(points: np.ndarray, disp: np.ndarray, within: bool = True) -> np.ndarray:
    """Where template ``points`` ``(N, 3)`` lie in an image ``image(x) = template(x + disp(x))``: the ``x`` with
    ``x + disp(x) = p`` (voxels of ``disp``'s grid), by ``x <- p - disp(x)``; ``disp`` ``(3, D, H, W)`` voxels.

    Raises ``ValueError`` unless every point converged to :data:`LOCATE_TOLERANCE` voxels, and (``within``) inside
    the grid: a field whose displacement gradient is no contraction there, or a point the image does not show.
    """
    x, residual = points.astype(np.float64), np.inf
    for _ in range(LOCATE_ITERATIONS):
        x = points - sample(disp, x)
        residual = np.abs(x + sample(disp, x) - points).max()
        if residual < LOCATE_TOLERANCE:
            break
    outside = ((x < 0) | (x > np.array(disp.shape[1:]) - 1)).any(axis=1).sum() if within else 0
    if residual >= LOCATE_TOLERANCE or outside:
        raise ValueError(
            f"landmarks not located inside the image: residual {residual:.2g} voxels after {LOCATE_ITERATIONS} "
            f"iterations, {outside} of {len(x)} outside the grid"
        )
    return x


def pair_landmarks(fixed_disp: np.ndarray, moving_disp: np.ndarray) -> dict:
    """The template landmarks in a generated pair, from each image's true ``(3, D, H, W)`` displacement:
    ``{"fixed_landmarks", "moving_landmarks"}``, ``(N, 3)`` float64 voxels of the pair's grid."""
    points = on_grid(template_landmarks(), fixed_disp.shape[1:])
    return {"fixed_landmarks": locate(points, fixed_disp), "moving_landmarks": locate(points, moving_disp)}


def tre(
    disp: np.ndarray, fixed_landmarks: np.ndarray, moving_landmarks: np.ndarray, after: np.ndarray | None = None
) -> float:
    """Mean distance in voxels between ``fixed_landmarks + disp(fixed_landmarks)`` and ``moving_landmarks``
    (``disp``: a method's ``(3, D, H, W)`` pull-back displacement on the fixed grid; ``after``: a ``(4, 4)`` voxel
    map applied to the mapped points first, when ``disp`` maps into another grid than the landmarks')."""
    mapped = fixed_landmarks + sample(disp, fixed_landmarks)
    if after is not None:
        mapped = mapped @ after[:3, :3].T + after[:3, 3]
    return float(np.linalg.norm(mapped - moving_landmarks, axis=1).mean())
