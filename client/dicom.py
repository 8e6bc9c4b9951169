"""DICOM in: an MR series (a folder or a list of files, single-frame or enhanced multi-frame) as a volume with its
affine, and a DICOM SEG as a label map on that volume's grid.

Needs the ``dicom`` extra (pydicom; highdicom writes SEG in :mod:`lumireg.client.dicom_out`). Conventions:

- The array is ``(columns, rows, slices)``: axis i runs along a row (the first direction cosine of Image
  Orientation (Patient)), axis j down a column (the second), axis k along the slice normal ``row x column``,
  slices sorted by their Image Position (Patient) projected on that normal, never by file name or Instance Number.
- The affine maps voxel indices to NIfTI RAS+ mm, as everywhere in lumireg: DICOM's LPS with x and y negated.
  Voxel centres sit at integer indices; the origin is the first slice's Image Position (Patient).
- Values are the stored values through Rescale Slope / Intercept (per slice or per frame): float32 when any
  rescale is not the identity, else the stored integer dtype.

Refused with :class:`DicomError` (a ``ValueError``) and one line that says why: no DICOM file, more than one
series without a chosen Series Instance UID, slices of different orientation or size, slices unevenly spaced
(a missing slice) or at the same position, a series with no pixel data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SPACING_TOLERANCE = 0.01  # slice gaps may differ from their median by this fraction before a series is refused
ORIENTATION_TOLERANCE = 1e-4  # direction cosines of two slices of one series differ by at most this


class DicomError(ValueError):
    """A DICOM input that cannot be read as one volume; the message says why."""


@dataclass
class DicomSeries:
    """A series read as a volume: ``data`` (columns, rows, slices), ``affine`` voxel -> RAS mm, and the
    ``datasets`` (headers without pixel data, one per slice in volume order; one for an enhanced multi-frame
    file) that results copy the patient, study and frame of reference from."""

    data: np.ndarray
    affine: np.ndarray
    datasets: list

    @property
    def first(self):
        return self.datasets[0]

    @property
    def series_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # the base install has no DICOM libraries
        raise DicomError("reading DICOM needs the dicom extra: pip install 'lumireg[dicom]'") from exc
    return pydicom


def is_dicom_source(source) -> bool:
    """True when ``source`` names DICOM input: a folder, a list of paths, or a file with the DICM preamble."""
    if isinstance(source, (list, tuple)):
        return True
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    if path.is_dir():
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _files(source) -> list[Path]:
    if isinstance(source, (list, tuple)):
        return [Path(p) for p in source]
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path]


def read_headers(source) -> list:
    """Every DICOM dataset under ``source`` (folder, list of files or one file), pixel data deferred; files that
    are not DICOM are skipped. :class:`DicomError` when none is DICOM."""
    pydicom = _pydicom()
    datasets = []
    for path in _files(source):
        if not path.is_file():
            raise DicomError(f"no such file: {path}")
        try:
            datasets.append(pydicom.dcmread(str(path), defer_size="1 KB"))
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
            continue
    if not datasets:
        raise DicomError(f"no DICOM file in {source}")
    return datasets


def choose_series(datasets: list, series_uid: str | None, what: str = "the series") -> list:
    """The datasets of one series: the only one, or the one ``series_uid`` names; :class:`DicomError` otherwise."""
    by_series: dict[str, list] = {}
    for ds in datasets:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if series_uid is not None:
        if series_uid not in by_series:
            raise DicomError(f"{what}: no series {series_uid} among {sorted(by_series)}")
        return by_series[series_uid]
    if len(by_series) > 1:
        raise DicomError(
            f"{what}: {len(by_series)} series found ({', '.join(sorted(by_series))}); choose one by Series Instance UID"
        )
    return next(iter(by_series.values()))


def _float_list(value, count: int, name: str) -> np.ndarray:
    array = np.array([float(v) for v in value or ()], dtype=np.float64)
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise DicomError(f"{name} must hold {count} numbers, got {value!r}")
    return array


def _rescale(ds) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


@dataclass
class _Plane:
    """One 2-D image of a series: position (LPS mm), orientation (6 cosines), spacing (row, column mm), pixels."""

    position: np.ndarray
    orientation: np.ndarray
    spacing: np.ndarray
    pixels: object  # () -> (rows, columns) stored values
    rescale: tuple[float, float]


def _single_frame_planes(datasets: list) -> list[_Plane]:
    planes = []
    for ds in datasets:
        if "PixelData" not in ds:
            raise DicomError(f"instance {ds.get('SOPInstanceUID', '?')} has no pixel data")
        planes.append(
            _Plane(
                _float_list(ds.get("ImagePositionPatient"), 3, "Image Position (Patient)"),
                _float_list(ds.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)"),
                _float_list(ds.get("PixelSpacing"), 2, "Pixel Spacing"),
                (lambda ds=ds: ds.pixel_array),
                _rescale(ds),
            )
        )
    return planes


def _frame_item(ds, frame: int, sequence: str):
    """A functional group item of one frame (0-based): the per-frame group's, else the shared one's, else None."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and sequence in per_frame[frame]:
        return per_frame[frame][sequence][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        return shared[0][sequence][0]
    return None


def _multi_frame_planes(ds) -> list[_Plane]:
    """The frames of an enhanced (multi-frame) image, each placed by its functional groups."""
    count = int(ds.NumberOfFrames)
    if "PixelData" not in ds:
        raise DicomError(f"instance {ds.get('SOPInstanceUID', '?')} has no pixel data")
    frames: list = []

    def pixels(n):
        if not frames:
            array = ds.pixel_array
            frames.append(array.reshape(count, *array.shape[-2:]))
        return frames[0][n]

    planes = []
    for n in range(count):
        position, orientation, measures = (
            _frame_item(ds, n, name)
            for name in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
        )
        if position is None or orientation is None or measures is None:
            raise DicomError(f"frame {n + 1} of instance {ds.get('SOPInstanceUID', '?')} has no plane position")
        transform = _frame_item(ds, n, "PixelValueTransformationSequence")
        planes.append(
            _Plane(
                _float_list(position.get("ImagePositionPatient"), 3, "Image Position (Patient)"),
                _float_list(orientation.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)"),
                _float_list(measures.get("PixelSpacing"), 2, "Pixel Spacing"),
                (lambda n=n: pixels(n)),
                _rescale(transform) if transform is not None else _rescale(ds),
            )
        )
    return planes


def _check_slices(planes: list[_Plane], what: str) -> tuple[list[_Plane], np.ndarray, float]:
    """Planes sorted along the normal, the normal (LPS), and the slice spacing (mm); refuses what is no volume."""
    orientation = planes[0].orientation
    if any(np.abs(p.orientation - orientation).max() > ORIENTATION_TOLERANCE for p in planes):
        raise DicomError(f"{what}: slices have different orientations (a localizer or a multi-stack series?)")
    if any(np.abs(p.spacing - planes[0].spacing).max() > 1e-4 for p in planes):
        raise DicomError(f"{what}: slices have different pixel spacings")
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.isclose(np.linalg.norm(normal), 1, atol=1e-3):
        raise DicomError(f"{what}: Image Orientation (Patient) is not two orthogonal unit vectors: {orientation}")
    depth = np.array([p.position @ normal for p in planes])
    order = np.argsort(depth, kind="stable")
    planes, depth = [planes[i] for i in order], depth[order]
    if len(planes) == 1:
        return planes, normal, 1.0
    gaps = np.diff(depth)
    if gaps.min() < 1e-3:
        raise DicomError(
            f"{what}: two slices at the same position ({depth[np.argmin(gaps)]:.3f} mm along the normal): "
            "several echoes, phases or repeats in one series are not one volume"
        )
    spacing = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - spacing)))
    if abs(gaps[worst] - spacing) > SPACING_TOLERANCE * spacing:
        raise DicomError(
            f"{what}: slices are unevenly spaced: a gap of {gaps[worst]:.3f} mm after slice {worst + 1} of "
            f"{len(planes)} where the others are {spacing:.3f} mm (a missing slice?)"
        )
    offsets = np.array([p.position - planes[0].position for p in planes])
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.abs(in_plane).max() > 0.01 * spacing + 1e-3:
        raise DicomError(f"{what}: slice positions do not lie on one line along the normal (a sheared stack)")
    return planes, normal, spacing


def _volume(planes: list[_Plane], what: str) -> tuple[np.ndarray, np.ndarray]:
    planes, normal, spacing = _check_slices(planes, what)
    stored = [np.asarray(p.pixels()) for p in planes]
    if any(s.ndim != 2 or s.shape != stored[0].shape for s in stored):
        raise DicomError(f"{what}: slices are not all single-channel images of one size")
    rescaled = any(p.rescale != (1.0, 0.0) for p in planes)
    data = np.stack([s.T for s in stored], axis=-1)
    if rescaled:
        slope = np.array([p.rescale[0] for p in planes], dtype=np.float32)
        intercept = np.array([p.rescale[1] for p in planes], dtype=np.float32)
        data = data.astype(np.float32) * slope + intercept
    row_spacing, column_spacing = planes[0].spacing
    lps = np.eye(4)
    lps[:3, 0] = planes[0].orientation[:3] * column_spacing
    lps[:3, 1] = planes[0].orientation[3:] * row_spacing
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = planes[0].position
    return data, LPS_TO_RAS @ lps


def read_series(source, series_uid: str | None = None, what: str = "the series") -> DicomSeries:
    """One MR (or other image) series as a :class:`DicomSeries`.

    Args:
        source: a folder (searched recursively), a list of files, or one file (an enhanced multi-frame image).
        series_uid: the Series Instance UID to read when the files hold more than one series.
        what: how messages name this input ("fixed", "moving").

    Raises:
        DicomError: the files are not one evenly spaced stack of parallel slices (see the module's docstring).
    """
    datasets = choose_series(read_headers(source), series_uid, what)
    if any(str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS for ds in datasets):
        raise DicomError(f"{what}: a segmentation (DICOM SEG) is not an image; give it as the moving labels")
    multi = [ds for ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi and len(datasets) > 1:
        raise DicomError(f"{what}: the series mixes multi-frame and single-frame instances")
    try:
        planes = _multi_frame_planes(multi[0]) if multi else _single_frame_planes(datasets)
        data, affine = _volume(planes, what)
    except DicomError:
        raise
    except Exception as exc:  # a pixel data decoder's failure, a malformed element
        raise DicomError(f"{what}: cannot decode the pixel data ({' '.join(str(exc).split())})") from exc
    if not multi:  # in volume order, as _check_slices sorted the planes
        normal = np.cross(*np.split(_float_list(datasets[0].ImageOrientationPatient, 6, "IOP"), 2))
        datasets = sorted(datasets, key=lambda ds: _float_list(ds.ImagePositionPatient, 3, "IPP") @ normal)
    for ds in datasets:
        if "PixelData" in ds:
            del ds.PixelData  # the headers are kept for the results; the pixels are in data
    return DicomSeries(data, affine, datasets)


def read_segmentation(source, affine: np.ndarray, shape, what: str = "moving_labels"):
    """A DICOM SEG as an int32 label map on a grid: each voxel holds the number of the segment that covers it.

    Every frame is placed by its Plane Position (Patient) onto the grid of ``affine`` (voxel -> RAS mm) and
    ``shape``; its plane must be one of the grid's slices (within 0.01 voxel) with the grid's in-plane axes.

    Args:
        source: the SEG file, or a folder / list holding exactly one.
        affine, shape: the grid the labels go on (the moving image's).

    Returns:
        (int32 array of ``shape``, list of the SEG's segment description datasets, the SEG dataset).

    Raises:
        DicomError: not a SEG, fractional or overlapping segments, a frame off the grid.
    """
    datasets = [ds for ds in read_headers(source) if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS]
    if len(datasets) != 1:
        raise DicomError(f"{what}: expected one DICOM SEG instance, found {len(datasets)}")
    seg = datasets[0]
    if str(seg.get("SegmentationType", "")) not in ("BINARY", "LABELMAP"):
        raise DicomError(f"{what}: a {seg.get('SegmentationType')} segmentation is not a label map")
    frames = np.asarray(seg.pixel_array).reshape(int(seg.get("NumberOfFrames", 1)), seg.Rows, seg.Columns)
    to_voxel = np.linalg.inv(LPS_TO_RAS @ _lps(affine))
    labels = np.zeros(tuple(shape), dtype=np.int32)
    for n in range(frames.shape[0]):
        position = _frame_item(seg, n, "PlanePositionSequence")
        orientation = _frame_item(seg, n, "PlaneOrientationSequence")
        identification = _frame_item(seg, n, "SegmentIdentificationSequence")
        if position is None or orientation is None or identification is None:
            raise DicomError(f"{what}: frame {n + 1} has no plane position or segment number")
        corner = to_voxel @ np.append(LPS_TO_RAS[:3, :3] @ _float_list(position.ImagePositionPatient, 3, "IPP"), 1)
        cosines = _float_list(orientation.ImageOrientationPatient, 6, "Image Orientation (Patient)")
        measures = _frame_item(seg, n, "PixelMeasuresSequence")
        spacing = _float_list(measures.PixelSpacing if measures else None, 2, "Pixel Spacing")[::-1]
        axes = to_voxel[:3, :3] @ (LPS_TO_RAS[:3, :3] @ np.stack([cosines[:3], cosines[3:]], axis=1))
        index = np.rint(corner[:3]).astype(int)
        unit = axes / np.linalg.norm(axes, axis=0)
        if (
            np.abs(corner[:3] - index).max() > 0.01
            or not np.allclose(unit, np.eye(3)[:, :2], atol=1e-3)
            or not np.allclose(spacing, np.linalg.norm(affine[:3, :2], axis=0), rtol=1e-4)
            or frames.shape[1:] != (shape[1], shape[0])
            or not 0 <= index[2] < shape[2]
            or index[0] != 0
            or index[1] != 0
        ):
            raise DicomError(
                f"{what}: SEG frame {n + 1} does not lie on a slice of the moving image's grid (the SEG must be "
                "drawn on the moving series)"
            )
        number = int(identification.ReferencedSegmentNumber)
        mask = frames[n].T > 0
        if str(seg.SegmentationType) == "LABELMAP":
            labels[..., index[2]] = np.where(mask, frames[n].T, labels[..., index[2]])
            continue
        if np.any(labels[..., index[2]][mask] != 0):
            raise DicomError(f"{what}: segments overlap (segment {number} on frame {n + 1}); a label map is needed")
        labels[..., index[2]][mask] = number
    return labels, list(seg.get("SegmentSequence", [])), seg


def _lps(affine: np.ndarray) -> np.ndarray:
    return LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
