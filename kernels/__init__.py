"""GPU primitives of registration: trilinear warping, scaling and squaring, local NCC, mutual information.

Each op is one file holding its Triton kernels, its ``torch.autograd.Function``
and its pure-PyTorch twin. CUDA tensors run the Triton kernels, CPU tensors the
twin; ``backend="triton"`` / ``backend="torch"`` force one (see ``_dispatch``).

Conventions (LUMIR's): volumes are ``(B, C, D, H, W)`` with D, H, W the NIfTI
array axes i, j, k; displacements are ``(B, 3, D, H, W)`` in voxel units,
channel c along array axis c, pull-back from the fixed grid; voxel centres sit
at integer coordinates (grid_sample's ``align_corners=True``).
"""

from lumireg.kernels.integrate import integrate
from lumireg.kernels.mutual_information import mutual_information
from lumireg.kernels.ncc import local_ncc
from lumireg.kernels.warp import warp

__all__ = ["warp", "integrate", "local_ncc", "mutual_information"]
