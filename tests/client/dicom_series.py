"""Writing synthetic volumes as DICOM series with pydicom, as scanners store them (for the DICOM tests).

A volume is ``(X, Y, Z)`` with a voxel -> RAS mm affine, as lumireg reads NIfTI; slice k of the series is
``data[:, :, k]``, its rows along the affine's j axis and its columns along i.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
PATIENT = {"PatientName": "Doe^Jane^Q", "PatientID": "PAT-0042", "PatientBirthDate": "19700101", "PatientSex": "F"}


def rotation(axis: int, degrees: float) -> np.ndarray:
    """(4, 4) rotation by ``degrees`` about world axis ``axis``."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    out = np.eye(4)
    out[a, a], out[a, b], out[b, a], out[b, b] = c, -s, s, c
    return out


def _ds(number: str) -> str:
    return f"{number:.12g}"


def _base(study: dict, series_uid: str, description: str, series_number: int, frame_uid: str) -> Dataset:
    ds = Dataset()
    for keyword, value in {**PATIENT, **study}.items():
        setattr(ds, keyword, value)
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "test"
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "8.1", "3.7", "1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def _file_meta(ds: Dataset) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def study_attributes(date: str = "20260101", time: str = "090000") -> dict:
    return {
        "StudyInstanceUID": generate_uid(),
        "StudyDate": date,
        "StudyTime": time,
        "StudyID": "1",
        "AccessionNumber": "ACC1",
        "ReferringPhysicianName": "",
    }


def write_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    study: dict | None = None,
    series_time: str = "090000",
    description: str = "T1 MPRAGE",
    series_number: int = 1,
    frame_uid: str | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
    instance_order: str = "forward",
    shuffle_names: bool = False,
    drop_slice: int | None = None,
    seed: int = 0,
) -> list[Path]:
    """``data`` (integer values, stored as ``(data - intercept) / slope``) as MR Image Storage files in ``folder``.

    ``instance_order`` "reversed" numbers the instances from the last slice; ``shuffle_names`` names the files at
    random; ``drop_slice`` leaves that slice out. Returns the paths written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine
    rows, columns = lps[:3, 0] / np.linalg.norm(lps[:3, 0]), lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    slope, intercept = rescale
    stored = np.rint((data - intercept) / slope).astype(np.int16)
    study = study or study_attributes()
    series_uid, frame_uid = generate_uid(), frame_uid or generate_uid()
    slices = [k for k in range(data.shape[2]) if k != drop_slice]
    names = [f"IM{n:04d}" for n in range(len(slices))]
    if shuffle_names:
        random.Random(seed).shuffle(names)
    paths = []
    for n, k in enumerate(slices):
        ds = _base(study, series_uid, description, series_number, frame_uid)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.SeriesTime, ds.SeriesDate = series_time, study["StudyDate"]
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.InstanceNumber = n + 1 if instance_order == "forward" else len(slices) - n
        ds.ImageOrientationPatient = [_ds(v) for v in (*rows, *columns)]
        ds.ImagePositionPatient = [_ds(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [_ds(np.linalg.norm(lps[:3, 1])), _ds(np.linalg.norm(lps[:3, 0]))]
        ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelRepresentation = 1
        if rescale != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        _file_meta(ds)
        paths.append(folder / names[n])
        ds.save_as(str(paths[-1]), enforce_file_format=True)
    return paths


def write_enhanced(path: Path, data: np.ndarray, affine: np.ndarray, frame_order: list[int] | None = None) -> Path:
    """``data`` as one Enhanced MR Image Storage file: a frame per slice (in ``frame_order``, default k order),
    placed by per-frame Plane Position and shared Plane Orientation / Pixel Measures, rescale per frame 1, 0."""
    lps = LPS @ affine
    rows, columns = lps[:3, 0] / np.linalg.norm(lps[:3, 0]), lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    order = list(range(data.shape[2])) if frame_order is None else frame_order
    ds = _base(study_attributes(), generate_uid(), "T1 enhanced", 3, generate_uid())
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber, ds.NumberOfFrames = 1, len(order)
    ds.Rows, ds.Columns, ds.PixelRepresentation = data.shape[1], data.shape[0], 1
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [_ds(v) for v in (*rows, *columns)]
    measures.PixelSpacing = [_ds(np.linalg.norm(lps[:3, 1])), _ds(np.linalg.norm(lps[:3, 0]))]
    measures.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        group, position, transform = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [_ds(v) for v in (lps @ [0, 0, k, 1])[:3]]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "1", "0", "US"
        group.PlanePositionSequence, group.PixelValueTransformationSequence = [position], [transform]
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack([data[:, :, k].T for k in order]).astype(np.int16).tobytes()
    _file_meta(ds)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def same_in_world(data_a, affine_a, data_b, affine_b, atol_mm: float = 1e-4) -> bool:
    """True when two volumes hold the same voxels at the same world points: their grids differ by a permutation and
    flip of axes only (checked to ``atol_mm`` at the grid's corners), and the voxels are exactly equal there."""
    if sorted(data_a.shape) != sorted(data_b.shape):
        return False
    mapping = np.linalg.inv(affine_a) @ affine_b  # b voxel -> a voxel
    linear = np.rint(mapping[:3, :3])
    if np.abs(np.abs(linear).sum(axis=0) - 1).max() or np.abs(np.abs(linear).sum(axis=1) - 1).max():
        return False
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in data_b.shape], indexing="ij")).reshape(3, -1)
    exact = affine_a[:3, :3] @ (np.rint(mapping[:3, :3] @ corners + mapping[:3, 3:4]))
    world = affine_b[:3, :3] @ corners
    if np.abs(exact + affine_a[:3, 3:4] - world - affine_b[:3, 3:4]).max() > atol_mm:
        return False
    index = np.rint(mapping[:3, :3] @ np.indices(data_b.shape).reshape(3, -1) + mapping[:3, 3:4]).astype(int)
    if (index < 0).any() or any((index[a] >= data_a.shape[a]).any() for a in range(3)):
        return False
    return bool(np.array_equal(data_a[tuple(index)].reshape(data_b.shape), data_b))
