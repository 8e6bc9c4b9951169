"""Fixtures of the PACS tests: a real Orthanc on free loopback ports, and the test pair as small NIfTI files."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # orthanc_server.py beside this file (pytest runs in importlib mode)

from orthanc_server import AFFINE, DICOMWEB_PLUGIN, ORTHANC, Orthanc  # noqa: E402


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    if not Path(ORTHANC).exists() or not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip("Orthanc and its DICOMweb plugin are not installed (apt-get install orthanc orthanc-dicomweb)")
    running = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def small_pair(pair, tmp_path_factory):
    """The test pair at 4 mm (every 4th voxel) as NIfTI files and labels 1..N (consecutive, as SEG numbers are)."""
    root = tmp_path_factory.mktemp("small_pair")
    fixed, moving = (pair[k][0, 0, ::4, ::4, ::4] for k in ("fixed", "moving"))
    raw = pair["moving_labels"][0, 0, ::4, ::4, ::4]
    values = np.unique(raw)
    labels = np.searchsorted(values[values > 0], raw) + 1
    labels[raw == 0] = 0
    files = {}
    for name, data in (("fixed", fixed), ("moving", moving), ("labels", labels.astype(np.int16))):
        files[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), AFFINE), str(files[name]))
    return files
