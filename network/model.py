"""The registration network: a symmetric, diffeomorphic U-Net in LUMIR's conventions.

Images ``(B, 1, D, H, W)``, intensities in 0..1 (LUMIR's uint8 / 255), D, H, W
multiples of :data:`lumireg.contract.SIZE_MULTIPLE` (16; LUMIR's 160 x 224 x 192
are). The network predicts a
stationary velocity field, integrates it by scaling and squaring at half
resolution and brings the displacement to full resolution:

- a Siamese encoder (shared weights) sees each image alone at 1/2, 1/4, 1/8
  and 1/16 of the input resolution;
- a decoder ``g`` sees the pair of feature stacks and returns to 1/2; the
  velocity is ``v = g(F, M) - g(M, F)``, so swapping the images gives exactly
  ``-v`` (inverse consistency by construction);
- ``integrate(v, steps)`` at 1/2 resolution (``steps``:
  :data:`lumireg.contract.INTEGRATION_STEPS` by default; ``lumireg.kernels``: Triton on CUDA,
  PyTorch on CPU), then x2 trilinear upsampling with the displacement scaled
  from half-resolution to full-resolution voxels. ``integrate(-v)`` gives the
  inverse at no extra network cost.

Working at half resolution is what keeps a CPU forward of one LUMIR pair
short (the README's tables and ``benchmarks/results/`` have the figures).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lumireg.contract import INTEGRATION_STEPS, check_size_multiple
from lumireg.kernels import integrate


@dataclass(frozen=True)
class NetworkConfig:
    """What rebuilds a :class:`LumiNet`; stored in every checkpoint.

    ``channels``: encoder widths at 1/2, 1/4, 1/8, 1/16 of the input
    resolution. ``steps``: scaling-and-squaring steps (default
    :data:`lumireg.contract.INTEGRATION_STEPS`, LUMIR's 7).
    """

    channels: tuple[int, int, int, int] = (8, 16, 32, 32)
    steps: int = INTEGRATION_STEPS

    def to_dict(self) -> dict:
        return {"channels": list(self.channels), "steps": self.steps}

    @classmethod
    def from_dict(cls, config: dict) -> NetworkConfig:
        unknown = set(config) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        return cls(**{**config, "channels": tuple(config.get("channels", cls.channels))})


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride, 1), nn.LeakyReLU(0.2))


def _upsample(x: torch.Tensor) -> torch.Tensor:
    # align_corners=False matches the geometry of the 2x2x2 average pooling / stride-2 halvings
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


def half_to_full(displacement: torch.Tensor) -> torch.Tensor:
    """``(B, 3, D/2, H/2, W/2)`` displacement in half-resolution voxels -> ``(B, 3, D, H, W)`` in full-resolution
    voxels (doubled, then upsampled trilinearly: linear, so the order is exact)."""
    return _upsample(2.0 * displacement)


def velocity_to_displacement(velocity: torch.Tensor, steps: int = INTEGRATION_STEPS) -> torch.Tensor:
    """Half-resolution velocity -> full-resolution displacement.

    Args:
        velocity: ``(B, 3, D/2, H/2, W/2)`` stationary velocity in half-resolution
            voxel units (channel k along array axis k).
        steps: scaling-and-squaring steps.

    Returns:
        ``(B, 3, D, H, W)`` float32 pull-back displacement in full-resolution
        voxel units. Pass ``-velocity`` for the inverse transform.
    """
    # integrated at half resolution, an eighth of the voxels
    return half_to_full(integrate(velocity, steps))


class LumiNet(nn.Module):
    """Symmetric diffeomorphic registration network (see the module docstring).

    With the default config: 218,771 parameters (0.85 MB in float32); the
    velocity at a voxel depends on the input images within a cube of 130
    voxels (mm) per side (receptive field, measured by back-propagation in the
    tests).
    """

    def __init__(self, config: NetworkConfig | None = None):
        super().__init__()
        self.config = config or NetworkConfig()
        c1, c2, c3, c4 = self.config.channels
        self.encoder = nn.ModuleList([_conv(1, c1), _conv(c1, c2, 2), _conv(c2, c3, 2), _conv(c3, c4, 2)])
        self.decoder = nn.ModuleList(
            [_conv(2 * c4, c4), _conv(c4 + 2 * c3, c3), _conv(c3 + 2 * c2, c2), _conv(c2 + 2 * c1, c1)]
        )
        self.head = nn.Conv3d(c1, 3, 3, 1, 1)
        # start from the identity transform, as VoxelMorph does
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def velocity(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` pair in 0..1 -> ``(B, 3, D/2, H/2, W/2)`` velocity in half-resolution voxels.

        This is the part exported to ONNX; it is antisymmetric in its inputs.
        """
        _check_pair(fixed, moving)
        batch = fixed.shape[0]
        x = F.avg_pool3d(torch.cat([fixed, moving]), 2)
        features = []
        for layer in self.encoder:
            x = layer(x)
            features.append(x)

        def both_orders(f: torch.Tensor) -> torch.Tensor:  # rows: (F, M) pairs, then (M, F) pairs
            a, b = f[:batch], f[batch:]
            return torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)])

        y = self.decoder[0](both_orders(features[3]))
        for layer, skip in zip(self.decoder[1:], (features[2], features[1], features[0])):
            y = layer(torch.cat([_upsample(y), both_orders(skip)], 1))
        v = self.head(y)
        return v[:batch] - v[batch:]

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` pair in 0..1 -> ``(B, 3, D, H, W)`` pull-back displacement (voxels).

        ``warp(moving, forward(fixed, moving))`` is the moving image on the fixed grid.
        """
        return velocity_to_displacement(self.velocity(fixed, moving), self.config.steps)

    def forward_and_inverse(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both transforms from one network pass: ``(B, 3, D, H, W)`` displacements in voxels.

        The first pulls moving onto the fixed grid, the second fixed onto the
        moving grid (the integral of ``-v``).
        """
        velocity = self.velocity(fixed, moving)
        steps = self.config.steps
        return velocity_to_displacement(velocity, steps), velocity_to_displacement(-velocity, steps)


def _check_pair(fixed: torch.Tensor, moving: torch.Tensor) -> None:
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.dim() != 5 or image.shape[1] != 1:
            raise ValueError(f"{name} must have shape (B, 1, D, H, W), got {tuple(image.shape)}")
        check_size_multiple(image.shape[2:], name)
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape")
