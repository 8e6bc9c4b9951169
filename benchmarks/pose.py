"""The accuracy benchmark's ``pose`` set: held-out pairs with the moving image stored as a scanner stores it.

Each pair is a ``synthetic`` held-out pair (:mod:`lumireg.train.synthetic`'s evaluation seeds) whose fixed image
stays a LUMIR image (uint8, 160 x 224 x 192, 1 mm RAS, the canvas centre at world 0) and whose moving image and
labels are re-stored in scanner pose (:func:`posed_pair`): the head rotated 10..30 degrees about a random axis and
shifted 10..30 mm in world space (:func:`lumireg.benchmarks.align.random_pose`, seeded per pair), on a grid of
1.0 x 1.0 x 1.3 mm voxels in LPS axis order covering a 200 x 240 x 200 mm field of view, intensities float32 in a
scanner's range. Every method gets the same posed images:

- ``none``: the posed labels resampled onto the fixed grid by the world affines alone (what a viewer shows);
- ``syn``: antspyx ``SyN`` (its own rigid and affine stages first) on the two NIfTI files, in world space;
- lumireg's methods: :class:`lumireg.client.registration.RegistrationClient`'s whole path (canvas placement,
  the server's ``align=affine`` for a non-LUMIR image, the answer mapped back onto the fixed grid), with the
  server's computation run in this process (:class:`InProcessClient`).
- ``lumireg-unposed``: the default request on the pair before posing, its displacement carried through the
  head's world motion (:func:`world_anchored`) and the posed labels warped with it: the same transform as on
  the unposed pair, so what it loses there is the posed labels' own resampling (nearest neighbour onto the
  rotated 1.3 mm grid and back), the ceiling of every method on this set.

Scored on the fixed grid: Dice and HD95 of the warped labels, and NDV and SDlogJ of the map from fixed voxels to
the world point each one corresponds to, in fixed voxels (1 mm), within the unposed moving image's mask.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lumireg.client import geometry
from lumireg.client.registration import RegistrationClient
from lumireg.contract import CANVAS, intensities_to_uint8

VOXEL_MM = (1.0, 1.0, 1.3)
FIELD_OF_VIEW_MM = (200.0, 240.0, 200.0)
SCANNER_MAXIMUM = 1000.0  # the posed image's intensity range 0..1000, float32 (not a LUMIR uint8 image)
POSE_SEED = 14  # the seed of pair k's pose is POSE_SEED + k
SYN_MARGIN = 48  # voxels: how far beyond the scanner's field of view SyN's world map is sampled


def fixed_affine() -> np.ndarray:
    """(4, 4) voxel -> RAS mm of the canvas as the pose set stores the fixed image: 1 mm, RAS, centre at world 0."""
    return geometry.canvas_affine_for(CANVAS, np.eye(4), np.zeros(3))


def posed_affine() -> tuple[np.ndarray, tuple[int, int, int]]:
    """The scanner grid: (4, 4) voxel -> RAS mm (LPS axis order, :data:`VOXEL_MM`) and its shape, centred on world 0."""
    shape = tuple(int(round(f / s)) for f, s in zip(FIELD_OF_VIEW_MM, VOXEL_MM))
    affine = np.diag([-VOXEL_MM[0], -VOXEL_MM[1], VOXEL_MM[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape, dtype=np.float64) - 1) / 2)
    return affine, shape


def posed_pair(sample: dict, index: int) -> dict:
    """Re-store a pair's moving image and labels in scanner pose.

    Args:
        sample: a held-out pair as :func:`lumireg.benchmarks.accuracy.pair_set` loads it (``(1, D, H, W)`` tensors
            on LUMIR's canvas; ``fixed``/``moving`` 0..1, labels int32).
        index: the pair's index in the set (seeds its pose).

    Returns:
        ``fixed``, ``moving``, ``moving_labels``: nibabel images (fixed: uint8 on the canvas with
        :func:`fixed_affine`; moving: float32 0..:data:`SCANNER_MAXIMUM` and labels int32 on :func:`posed_affine`);
        ``world``: the (4, 4) RAS-mm rigid motion of the head (a point of the unposed head at ``p`` sits at
        ``world @ p`` in the posed image).
    """
    import torch

    from lumireg.benchmarks.align import random_pose

    if tuple(sample["fixed"].shape[1:]) != CANVAS:
        raise ValueError(f"the pose set is defined on LUMIR's canvas {CANVAS}, got {tuple(sample['fixed'].shape[1:])}")
    canvas = fixed_affine()
    pull = np.array(random_pose(torch.Generator().manual_seed(POSE_SEED + index), CANVAS))  # canvas voxels
    world = canvas @ np.linalg.inv(pull) @ np.linalg.inv(canvas)
    affine, shape = posed_affine()
    # posed voxel q shows the unposed head's canvas voxel pull @ inv(canvas) @ affine @ q
    to_source = pull @ np.linalg.inv(canvas) @ affine
    moving, labels = (sample[k][0].numpy() for k in ("moving", "moving_labels"))

    def resample(volume, order):
        return ndimage.affine_transform(
            volume, to_source[:3, :3], to_source[:3, 3], output_shape=shape, order=order, mode="grid-constant", cval=0
        )

    fixed = nib.Nifti1Image(intensities_to_uint8(sample["fixed"][0].numpy()), canvas)
    posed = nib.Nifti1Image((resample(moving.astype(np.float32), 1) * SCANNER_MAXIMUM).astype(np.float32), affine)
    posed_labels = nib.Nifti1Image(resample(labels.astype(np.int32), 0).astype(np.int32), affine)
    for image in (fixed, posed, posed_labels):
        image.set_qform(image.affine, code=1)
        image.set_sform(image.affine, code=1)
    return {"fixed": fixed, "moving": posed, "moving_labels": posed_labels, "world": world}


def to_unposed(pair: dict) -> np.ndarray:
    """``(4, 4)``: fixed-grid voxel coordinates of a world point in the posed image (what a world-anchored
    displacement maps to, :func:`on_fixed_grid`) -> the canvas voxel of the unposed moving image showing it."""
    canvas = fixed_affine()
    return np.linalg.inv(canvas) @ np.linalg.inv(pair["world"]) @ canvas


class InProcessClient(RegistrationClient):
    """:class:`RegistrationClient` whose requests the service's own computation answers in this process
    (:func:`lumireg.service.pipeline.register_in_process`), so a benchmark runs the client's whole path without a
    server. ``network``: ``(fixed, moving) -> velocity`` on ``uint8 (B, 1, D, H, W)`` tensors."""

    def __init__(self, network, steps: int):
        self.network, self.steps = network, steps
        self.url = "in-process"

    def close(self) -> None:
        pass

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str], parameters: dict | None = None) -> dict:
        from lumireg.contract import request_parameters
        from lumireg.service.pipeline import register_in_process

        out = register_in_process(
            self.network,
            inputs["fixed"],
            inputs["moving"],
            outputs,
            moving_labels=inputs.get("moving_labels"),
            steps=self.steps,
            **request_parameters(parameters or {}),
        )
        return {
            name: np.array(value, dtype=object) if name == "qc" else value.detach().cpu().numpy()
            for name, value in out.items()
        }


def _canvas_grid() -> np.ndarray:
    """``(3, *CANVAS)`` float64: each canvas voxel's own index."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in CANVAS], indexing="ij"))


def _world_map(coordinates: np.ndarray) -> np.ndarray:
    """``(3, X, Y, Z)`` RAS mm world points of the fixed voxels -> their displacement in fixed voxels."""
    grid = _canvas_grid()
    inverse = np.linalg.inv(fixed_affine())
    voxels = np.einsum("ij,j...->i...", inverse[:3, :3], coordinates) + inverse[:3, 3, None, None, None]
    return (voxels - grid).astype(np.float32)


def world_anchored(pair: dict, disp: np.ndarray) -> np.ndarray:
    """A displacement of the unposed pair (``(3, *CANVAS)`` fixed voxels into the unposed moving canvas) as the
    posed pair's world-anchored one (:func:`on_fixed_grid`): each mapped point carried through the head's motion."""
    mapped = _canvas_grid() + disp
    motion = pair["world"] @ fixed_affine()
    return _world_map(np.einsum("ij,j...->i...", motion[:3, :3], mapped) + motion[:3, 3, None, None, None])


def on_fixed_grid(pair: dict, name: str, disp: np.ndarray) -> np.ndarray:
    """The posed ``pair[name]`` (``"moving"``: float32 scaled to 0..1, or ``"moving_labels"``) on the fixed grid
    through the world-anchored ``disp`` ((3, *CANVAS) fixed voxels, :func:`geometry.warp_to_fixed`)."""
    fixed = geometry.Placement(CANVAS, pair["fixed"].affine, pair["fixed"].affine, True)
    moving = geometry.Placement(pair["moving"].shape, pair["moving"].affine, pair["moving"].affine, False)
    data = np.asanyarray(pair[name].dataobj)
    labels = name == "moving_labels"
    out = geometry.warp_to_fixed(data, disp, fixed, moving, labels=labels)
    return out if labels else out / SCANNER_MAXIMUM


def register_none(pair: dict) -> tuple[np.ndarray, np.ndarray]:
    """No registration: the posed labels on the fixed grid by the world affines alone; the identity map."""
    zero = np.zeros((3, *CANVAS), np.float32)
    return on_fixed_grid(pair, "moving_labels", zero), zero


def register_lumireg(pair: dict, client: InProcessClient, request: dict) -> tuple[np.ndarray, np.ndarray]:
    """lumireg through the client: warped labels (fixed grid) and the displacement (fixed voxels, world-anchored)."""
    result = client.register(
        pair["fixed"], pair["moving"], ["displacement", "warped_labels"], pair["moving_labels"], **request
    )
    disp = np.moveaxis(np.asanyarray(result.displacement.dataobj), -1, 0).astype(np.float32)
    return np.asanyarray(result.warped_labels.dataobj), disp


def register_syn(pair: dict) -> tuple[np.ndarray, np.ndarray]:
    """antspyx SyN (rigid, affine, then SyN) on the two NIfTI files: warped labels and the world map as a
    displacement in fixed voxels (each world coordinate of the moving grid carried through the transforms)."""
    import ants

    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for name in ("fixed", "moving", "moving_labels"):
            paths[name] = str(Path(folder) / f"{name}.nii.gz")
            nib.save(pair[name], paths[name])
        fixed, moving, labels = (ants.image_read(paths[n]) for n in ("fixed", "moving", "moving_labels"))
        transforms = ants.registration(fixed, moving, type_of_transform="SyN")["fwdtransforms"]
        warped = ants.apply_transforms(fixed, labels, transforms, interpolator="nearestNeighbor").numpy()
        affine = pair["moving"].affine
        # the moving grid grown by SYN_MARGIN voxels each side: the coordinate maps must also cover the fixed voxels
        # that map just outside the scanner's field of view (a head the field of view cuts), or they read 0 there
        grid = np.meshgrid(
            *[np.arange(-SYN_MARGIN, n + SYN_MARGIN, dtype=np.float64) for n in pair["moving"].shape], indexing="ij"
        )
        direction, spacing = np.asarray(moving.direction), np.asarray(moving.spacing)
        origin = np.asarray(moving.origin) - direction @ (spacing * SYN_MARGIN)
        world = []
        for axis in range(3):  # a linear function of the voxel index, warped linearly: exact inside the grown grid
            coordinate = (sum(affine[axis, k] * grid[k] for k in range(3)) + affine[axis, 3]).astype(np.float32)
            image = ants.from_numpy(coordinate, origin=tuple(origin), spacing=tuple(spacing), direction=direction)
            world.append(ants.apply_transforms(fixed, image, transforms, interpolator="linear").numpy())
    return np.rint(warped).astype(np.int32), _world_map(np.stack(world))
