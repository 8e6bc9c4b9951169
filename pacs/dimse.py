"""DIMSE with pynetdicom: the node's C-STORE SCP, and C-FIND / C-GET / C-STORE as SCU towards the PACS.

The SCP accepts every storage SOP class on the association but keeps only images it can register (MR Image,
Enhanced MR Image) and segmentations; anything else, or an image without what placing it needs, is refused
with a C-STORE failure status and logged by its UIDs. Fixed series are retrieved with C-GET (the instances come
back on the same association, so nothing has to know the node's address).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import MRImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    EnhancedMRImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from lumireg.pacs.attributes import SERIES_KEYS, attributes_of, query

log = logging.getLogger("lumireg.pacs")
ACCEPTED = {str(MRImageStorage), str(EnhancedMRImageStorage), str(SegmentationStorage)}
REFUSED_SOP_CLASS = 0x0122  # C-STORE: SOP class not supported
REFUSED_MALFORMED = 0xA900  # C-STORE: data set does not match SOP class
REFUSED_UNREADABLE = 0xC000  # C-STORE: cannot understand
OUT_OF_RESOURCES = 0xA700
IMAGE_NEEDS = ("PixelData", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


class DeliveryError(RuntimeError):
    """Results could not be stored in the PACS (it is down, or refused them); the message says which."""


def parse_address(text: str) -> tuple[str, str, int]:
    """``AE@host:port`` -> (AE title, host, port); ``ValueError`` otherwise."""
    try:
        title, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        if not title or len(title) > 16 or not host:
            raise ValueError
        return title, host, int(port)
    except ValueError:
        raise ValueError(f"expected AE@host:port (an AE title of 1..16 characters), got {text!r}") from None


def check_instance(ds) -> str | None:
    """Why an instance cannot be kept (a phrase), or None."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in ACCEPTED:
        return f"SOP class {sop_class or '(none)'} is not an MR image or a segmentation"
    missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if k not in ds]
    if sop_class == str(MRImageStorage):
        missing += [k for k in IMAGE_NEEDS if k not in ds]
    elif "PixelData" not in ds:
        missing.append("PixelData")
    return f"missing {', '.join(missing)}" if missing else None


def save_instance(ds, spool: Path) -> Path:
    """``ds`` as ``<spool>/<series UID>/<SOP UID>.dcm``, whole or not at all."""
    folder = spool / str(ds.SeriesInstanceUID)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{ds.SOPInstanceUID}.dcm"
    partial = folder / f".partial-{ds.SOPInstanceUID}"
    ds.save_as(str(partial), enforce_file_format=True)
    partial.replace(target)
    return target


class StoreSCP:
    """A C-STORE (and C-ECHO) SCP on ``port`` as ``ae_title``; ``on_instance(ds, path)`` for each kept instance."""

    def __init__(self, ae_title: str, host: str, port: int, spool: Path, on_instance, on_refused):
        self.ae = AE(ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)
        self.spool, self.on_instance, self.on_refused = spool, on_instance, on_refused
        self.server = self.ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:  # a data set that does not decode
            self.on_refused("?", f"cannot decode the data set ({type(exc).__name__})")
            return REFUSED_UNREADABLE
        reason = check_instance(ds)
        if reason:
            self.on_refused(str(ds.get("SOPInstanceUID", "?")), reason)
            return REFUSED_SOP_CLASS if "SOP class" in reason else REFUSED_MALFORMED
        try:
            path = save_instance(ds, self.spool)
        except OSError as exc:
            log.error("instance %s: cannot spool it: %s", ds.SOPInstanceUID, exc.strerror or exc)
            return OUT_OF_RESOURCES
        self.on_instance(ds, path)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


class DimsePacs:
    """The PACS over DIMSE: ``pacs`` is queried (C-FIND) and retrieved from (C-GET); results go to ``destination``
    (C-STORE); both ``(AE title, host, port)``. ``ae_title`` is the node's own."""

    def __init__(self, ae_title: str, pacs: tuple[str, str, int], destination: tuple[str, str, int] | None = None):
        self.ae_title, self.pacs, self.destination = ae_title, pacs, destination or pacs

    def _associate(self, address, contexts, roles=(), handlers=()):
        ae = AE(self.ae_title)
        for context in contexts:
            ae.add_requested_context(context)
        title, host, port = address
        assoc = ae.associate(host, port, ae_title=title, ext_neg=list(roles), evt_handlers=list(handlers))
        if not assoc.is_established:
            raise DeliveryError(f"no association with {title}@{host}:{port}")
        return assoc

    def find_series(self, **keys) -> list[dict]:
        """Series-level C-FIND (study root): the series matching ``keys`` (keyword -> value), as attribute dicts."""
        found = []
        assoc = self._associate(self.pacs, [StudyRootQueryRetrieveInformationModelFind])
        try:
            for status, identifier in assoc.send_c_find(
                query("SERIES", SERIES_KEYS, keys), StudyRootQueryRetrieveInformationModelFind
            ):
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    found.append(attributes_of(identifier))
        finally:
            assoc.release()
        return found

    def fetch(self, study: str, series: str, spool: Path) -> Path:
        """C-GET of one series into ``<spool>/<series>/``; returns that folder."""
        folder = spool / series
        kept = []

        def store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            kept.append(save_instance(ds, spool))
            return 0x0000

        classes = [MRImageStorage, EnhancedMRImageStorage, SegmentationStorage]
        assoc = self._associate(
            self.pacs,
            [StudyRootQueryRetrieveInformationModelGet, *classes],
            roles=[build_role(c, scp_role=True) for c in classes],
            handlers=[(evt.EVT_C_STORE, store)],
        )
        try:
            statuses = [
                s.Status
                for s, _ in assoc.send_c_get(
                    query("SERIES", (), {"StudyInstanceUID": study, "SeriesInstanceUID": series}),
                    StudyRootQueryRetrieveInformationModelGet,
                )
                if s
            ]
        finally:
            assoc.release()
        if not kept or (statuses and statuses[-1] not in (0x0000, 0xB000)):
            raise DeliveryError(f"C-GET of series {series} returned {len(kept)} instances")
        return folder

    def store(self, paths: list[Path]) -> None:
        """C-STORE each file to the destination; :class:`DeliveryError` unless every one succeeds."""
        datasets = [dcmread(str(p)) for p in paths]
        classes = sorted({str(ds.SOPClassUID) for ds in datasets})
        assoc = self._associate(self.destination, classes)
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if not status or status.Status not in (0x0000, 0xB000, 0xB007, 0xB006):
                    code = f"0x{status.Status:04X}" if status else "no answer"
                    raise DeliveryError(f"C-STORE of {ds.SOPInstanceUID} to {self.destination[0]}: {code}")
        finally:
            assoc.release()
