"""The wire contract of the ``lumireg`` model: names, types and shapes every client relies on.

Plain constants, no torch: the client library imports this module too.
Shapes are per pair (Triton adds the batch axis in front, up to
:data:`MAX_BATCH_SIZE`). Volumes are LUMIR's canvas, 160 x 224 x 192 voxels
at 1 mm, axes as the NIfTI data array is stored.
"""

from __future__ import annotations

CANVAS = (160, 224, 192)
CANVAS_SPACING_MM = 1.0
CANVAS_ORIENTATION = ("R", "A", "S")  # array axes i, j, k point right, anterior, superior (the template's)
HALF_CANVAS = tuple(n // 2 for n in CANVAS)  # the network's velocity grid
ENTRY_MODEL, NETWORK_MODEL = "lumireg", "lumireg_network"
MAX_BATCH_SIZE = 8

# (name, Triton type, dims, optional)
INPUTS = (
    ("fixed", "TYPE_UINT8", (1, *CANVAS), False),  # intensities 0..255
    ("moving", "TYPE_UINT8", (1, *CANVAS), False),
    ("moving_labels", "TYPE_INT32", (1, *CANVAS), True),  # only for warped_labels
)
# (name, Triton type, dims); each is computed only when a request asks for it
OUTPUTS = (
    ("displacement", "TYPE_FP32", (3, *CANVAS)),  # voxels, pull-back from the fixed grid, channel c along axis c
    ("displacement_fp16", "TYPE_FP16", (3, *CANVAS)),
    ("inverse_displacement", "TYPE_FP32", (3, *CANVAS)),  # pulls the fixed image onto the moving grid
    ("warped", "TYPE_FP32", (1, *CANVAS)),  # moving resampled onto the fixed grid, trilinear, 0..255
    ("warped_labels", "TYPE_INT32", (1, *CANVAS)),  # moving_labels resampled, nearest neighbour
    ("qc", "TYPE_STRING", (1,)),  # UTF-8 JSON, see lumireg.service.pipeline.quality_report
)
OUTPUT_NAMES = tuple(name for name, *_ in OUTPUTS)
