"""LUMIR metrics (Dice, HD95, TRE, NDV) and the evaluation runner.

``lumireg.evaluate.metrics`` holds the metrics on numpy arrays and
``lumireg.evaluate.runner`` the ``lumireg evaluate`` command, both matching the
official LUMIR evaluator; numpy, scipy, nibabel and surface-distance (the official HD95) only (no torch), so the
service's quality report and a PACS host can use them.
"""

from lumireg.evaluate.metrics import (
    as_channels_last,
    dice,
    digital_jacobians,
    hd95,
    jacobian_determinant,
    landmark_distances,
    ndv_percent,
    sdlogj,
    tre,
    warp_labels_nearest,
)
from lumireg.evaluate.runner import EvaluationError, evaluate, load_config, write_report

__all__ = [
    "as_channels_last",
    "dice",
    "digital_jacobians",
    "hd95",
    "jacobian_determinant",
    "landmark_distances",
    "ndv_percent",
    "sdlogj",
    "tre",
    "warp_labels_nearest",
    "EvaluationError",
    "evaluate",
    "load_config",
    "write_report",
]
