"""The series-level attributes the node keeps, matches rules on and queries by (DICOM keywords)."""

from __future__ import annotations

SERIES_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
)


def attributes_of(ds) -> dict:
    """The :data:`SERIES_KEYS` of a pydicom dataset as plain strings ("" when absent)."""
    return {k: str(ds.get(k, "") or "") for k in SERIES_KEYS}


def query(level: str, keys, values: dict):
    """A C-FIND / C-GET identifier: ``QueryRetrieveLevel`` ``level``, the return ``keys`` empty, ``values`` set."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, "")
    for key, value in values.items():
        setattr(ds, key, value)
    return ds
