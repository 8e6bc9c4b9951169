"""DICOM out: the warped moving image as a derived MR series and the warped labels as a DICOM SEG, both on the
fixed series' grid, in the fixed series' patient, study and frame of reference.

Needs the ``dicom`` extra (pydicom, highdicom). Conventions:

- Volumes are ``(columns, rows, slices)`` on the fixed series' grid, slice k in the order
  :func:`lumireg.client.dicom.read_series` sorted the fixed series (by position along the normal); slice k of
  the output takes slice k's Image Position (Patient) and the series' orientation and pixel spacing.
- New UIDs (series, instances) come from ``uid_root``: by default :data:`UID_ROOT`, ``2.25.`` followed by the
  decimal of a name-based UUID (ISO/IEC 9834-8's UUID-derived arc, which needs no registration); a hospital
  passes its own root (``--uid-root``). They are derived from the source series' UIDs, the output's name and the
  weights, so the same registration written twice gives the same UIDs: a PACS that receives it twice keeps one
  copy.
- Patient attributes are copied from the fixed series, never made up; nothing is logged.
- The displacement has no DICOM form here (no maintained library writes a Deformable Spatial Registration
  object correctly); it stays ``displacement.nii.gz`` beside the DICOM files.
"""

from __future__ import annotations

import datetime
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from lumireg import __version__
from lumireg.client.dicom import DicomSeries

UID_ROOT = None  # "2.25." + a name-based UUID of the sources (UUID-derived, no registration needed)
SERIES_NUMBER = {"warped": 9001, "warped_labels": 9002}
MANUFACTURER = "lumireg"
PATIENT_STUDY = (  # copied from the fixed series as they are: Patient, General Study, Patient Study modules
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "OtherPatientIDsSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
MR_ACQUISITION = (  # the moving series' contrast: what the warped image still shows (MR Image module)
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
    "InversionTime",
    "MagneticFieldStrength",
    "ImagedNucleus",
    "FlipAngle",
)
MR_TYPE1 = {"ScanningSequence": "RM", "SequenceVariant": "NONE", "ImageType": None}  # stand-ins for unknown type 1


def new_uid(uid_root: str | None, *sources: str) -> str:
    """A UID determined by ``sources`` (the same sources, the same UID): under ``uid_root`` (pydicom's hash of the
    sources), or with None ``2.25.`` and a name-based UUID (version 5) of the sources, as ISO/IEC 9834-8 asks."""
    from pydicom.uid import generate_uid

    if uid_root is None:
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(str(s) for s in sources)).int}"
    return str(generate_uid(prefix=uid_root, entropy_srcs=[str(s) for s in sources]))


def series_description(what: str, model: str | None) -> str:
    """``lumireg <version> <model> <what>``, cut to the 64 characters of a DICOM LO."""
    return " ".join(p for p in ("lumireg", __version__, model or "", what) if p)[:64]


def _copy(target, source, keywords) -> None:
    for keyword in keywords:
        if keyword in source:
            setattr(target, keyword, source[keyword].value)


def _pixels(volume: np.ndarray):
    """Rounded stored values, their dtype, and the rescale (slope, intercept) that gives the volume back."""
    finite = np.where(np.isfinite(volume), volume, 0)
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0 and hi <= 65535:
        return np.rint(finite).astype(np.uint16), (1.0, 0.0)
    if lo >= -32768 and hi <= 32767:
        return np.rint(finite).astype(np.int16), (1.0, 0.0)
    slope = (hi - lo) / 65535
    return np.rint((finite - lo) / slope).astype(np.uint16), (slope, lo)


def _references(series: DicomSeries, purpose_code):
    from pydicom.dataset import Dataset

    items = []
    for ds in series.datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        item.PurposeOfReferenceCodeSequence = [purpose_code]
        items.append(item)
    return items


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def derived_series(
    warped: np.ndarray, fixed: DicomSeries, moving: DicomSeries | None, model: str | None, uid_root=UID_ROOT
) -> list:
    """The warped moving image as a derived MR Image Storage series, one dataset per slice of the fixed grid.

    Args:
        warped: (columns, rows, slices) float32 on the fixed series' grid (rounded to whole stored values, and
            rescaled only when they do not fit 16 bits).
        fixed: the fixed series (patient, study, frame of reference, geometry).
        moving: the moving series when it was DICOM (Source Image Sequence, MR acquisition attributes), or None.
        model: the weights' name (QC report's ``model``), for the Series Description.
        uid_root: root of the new UIDs (see the module's docstring).

    Returns:
        pydicom datasets with file meta, ready for ``save_as`` or a C-STORE / STOW.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    if warped.shape != fixed.data.shape:
        raise ValueError(f"the warped image {warped.shape} is not on the fixed grid {fixed.data.shape}")
    stored, (slope, intercept) = _pixels(warped)
    moving_uid = moving.series_uid if moving else "nifti"
    series_uid = new_uid(uid_root, fixed.series_uid, moving_uid, model, "warped")
    now = datetime.datetime.now()
    source_purpose = _code("121322", "DCM", "Source image for image processing operation")
    sources = _references(moving, source_purpose) if moving else []
    first = fixed.first
    out = []
    for k in range(fixed.data.shape[2]):
        ds = Dataset()
        _copy(ds, first, PATIENT_STUDY)
        _copy(ds, moving.first if moving else Dataset(), MR_ACQUISITION)
        for keyword, default in MR_TYPE1.items():
            if default and keyword not in ds:
                setattr(ds, keyword, default)
        for keyword in ("MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime", "ScanOptions"):
            if keyword not in ds:
                setattr(ds, keyword, None)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = new_uid(uid_root, series_uid, k)
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = first.FrameOfReferenceUID
        ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
        ds.Modality = "MR"
        ds.SeriesNumber = SERIES_NUMBER["warped"]
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = series_description("warped", model)
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.DerivationDescription = (
            f"moving series {moving_uid} deformably registered to series {fixed.series_uid} by lumireg"
        )[:1024]
        ds.DerivationCodeSequence = [_code("125027", "DCM", "Deformed for Registration")]
        if sources:
            ds.SourceImageSequence = sources
        ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, model or "lumireg"
        ds.SoftwareVersions = __version__
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.PatientPosition, ds.Laterality = None, None  # type 2C: the fixed series' values, else empty
        _copy(ds, first, ("PatientPosition", "Laterality"))
        ds.ImageOrientationPatient, ds.ImagePositionPatient = _plane(fixed, k)
        ds.PixelSpacing = [f"{v:.10g}" for v in np.linalg.norm(fixed.affine[:3, [1, 0]], axis=0)]
        ds.SliceThickness = f"{np.linalg.norm(fixed.affine[:3, 2]):.10g}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = int(stored.dtype == np.int16)
        if (slope, intercept) != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.10g}", f"{intercept:.10g}", "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _plane(fixed: DicomSeries, k: int) -> tuple[list[str], list[str]]:
    """Image Orientation and Position (Patient) of slice k of the fixed grid, LPS, as DICOM decimal strings."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ fixed.affine
    rows, columns = (lps[:3, a] / np.linalg.norm(lps[:3, a]) for a in (0, 1))
    position = lps[:3, 3] + k * lps[:3, 2]
    return [f"{v:.10g}" for v in (*rows, *columns)], [f"{v:.10g}" for v in position]


def segmentation(
    labels: np.ndarray, fixed: DicomSeries, segments: list | None, model: str | None, tag: str, uid_root=UID_ROOT
):
    """The warped labels as a BINARY DICOM SEG (highdicom) on the fixed series.

    Args:
        labels: (columns, rows, slices) integers on the fixed grid, 0 background.
        fixed: the fixed series (source images of the SEG).
        segments: the moving SEG's Segment Sequence items (their numbers are the label values, their labels and
            codes are kept), or None: each label value v becomes a segment ``label v`` (numbered 1.. in order of
            value, as DICOM asks for consecutive numbers).
        model: the weights' name, for the Series Description; tag: the source UIDs the new UIDs derive from.

    Returns:
        the SEG dataset, or None when no label is left on the fixed grid.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        return None
    known = {int(item.SegmentNumber): item for item in segments or []}
    if known and set(values) <= set(known):
        numbers = {v: v for v in values}
    else:
        known, numbers = {}, {v: n + 1 for n, v in enumerate(values)}
    volume = np.zeros(labels.shape[::-1], dtype=np.uint16)
    for value, number in numbers.items():
        volume[labels.T == value] = number
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name="lumireg", version=__version__, family=codes.DCM.ArtificialIntelligence
    )
    for number in range(1, max(numbers.values()) + 1):
        item = known.get(number)
        value = next((v for v, n in numbers.items() if n == number), number)
        label = str(item.SegmentLabel) if item is not None and "SegmentLabel" in item else f"label {value}"
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=_coded(item, "SegmentedPropertyCategoryCodeSequence", codes.SCT.Tissue),
                segmented_property_type=_coded(item, "SegmentedPropertyTypeCodeSequence", codes.SCT.Tissue),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    series_uid = new_uid(uid_root, tag, model, "warped_labels")
    return hd.seg.Segmentation(
        source_images=fixed.datasets,
        pixel_array=volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER["warped_labels"],
        sop_instance_uid=new_uid(uid_root, series_uid, 0),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model or "lumireg",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description("warped labels", model),
    )


def _coded(item, keyword: str, default):
    import highdicom as hd

    if item is None or keyword not in item:
        return default
    code = item[keyword].value[0]
    return hd.sr.CodedConcept(code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)


def write_series(datasets: list, folder: Path) -> list[Path]:
    """Each dataset as ``<folder>/<SOP Instance UID>.dcm``; the folder appears whole or not at all."""
    folder = Path(folder)
    partial = folder.with_name(f".partial-{os.getpid()}-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for ds in datasets:
            ds.save_as(str(partial / f"{ds.SOPInstanceUID}.dcm"), enforce_file_format=True)
        shutil.rmtree(folder, ignore_errors=True)
        partial.replace(folder)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return sorted(folder.iterdir())


DICOM_OUTPUTS = {"warped": "warped", "warped_labels": "warped_labels"}  # folder names under the output folder


def save(result, out_dir, uid_root: str | None = UID_ROOT) -> dict[str, Path]:
    """A :class:`~lumireg.client.registration.RegistrationResult` written with DICOM images.

    ``<out_dir>/warped/`` holds the derived MR series (one file per slice), ``<out_dir>/warped_labels/`` the SEG
    (none when no label is left on the fixed grid); the fields and ``qc.json`` are written as NIfTI / JSON
    beside them. Needs a DICOM fixed image; its patient, study and frame of reference are the results'.

    Raises:
        InputError: the fixed image was not DICOM. OutputError: a file could not be written.
    """
    from lumireg.client.registration import FILES, InputError, OutputError

    fixed = result.inputs.get("fixed")
    if fixed is None or not isinstance(fixed.dicom, DicomSeries):
        raise InputError("DICOM output needs a DICOM fixed image (its patient, study and frame of reference)")
    moving, labels = result.inputs.get("moving"), result.inputs.get("moving_labels")
    moving_series = moving.dicom if moving is not None and isinstance(moving.dicom, DicomSeries) else None
    model = (result.qc or {}).get("model")
    out_dir = Path(out_dir)
    written = result._save_files(out_dir, {k: v for k, v in FILES.items() if k not in DICOM_OUTPUTS})
    tag = f"{fixed.dicom.series_uid}/{moving_series.series_uid if moving_series else 'nifti'}"
    try:
        if result.warped is not None:
            warped = np.asarray(result.warped.dataobj, dtype=np.float32)
            datasets = derived_series(warped, fixed.dicom, moving_series, model, uid_root)
            write_series(datasets, out_dir / DICOM_OUTPUTS["warped"])
            written["warped"] = out_dir / DICOM_OUTPUTS["warped"]
        if result.warped_labels is not None:
            segments = labels.dicom if labels is not None and isinstance(labels.dicom, list) else None
            seg = segmentation(np.asarray(result.warped_labels.dataobj), fixed.dicom, segments, model, tag, uid_root)
            if seg is not None:
                write_series([seg], out_dir / DICOM_OUTPUTS["warped_labels"])
                written["warped_labels"] = out_dir / DICOM_OUTPUTS["warped_labels"]
    except OSError as exc:
        raise OutputError(f"cannot write DICOM results into {out_dir}: {exc.strerror or exc}") from exc
    return written
