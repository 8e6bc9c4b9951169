"""DICOMweb with dicomweb-client: QIDO-RS to find series, WADO-RS to fetch them, STOW-RS to store results."""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset, dcmread

from lumireg.pacs.attributes import SERIES_KEYS, attributes_of
from lumireg.pacs.dimse import DeliveryError, save_instance

COUNT = "NumberOfSeriesRelatedInstances"


class DicomWebPacs:
    """The PACS at ``url`` (its DICOMweb root, e.g. ``http://pacs:8042/dicom-web``)."""

    def __init__(self, url: str, timeout: float = 60.0):
        from dicomweb_client.api import DICOMwebClient

        self.url = url
        self.client = DICOMwebClient(url, timeout=timeout)

    def find_series(self, **keys) -> list[dict]:
        """QIDO-RS ``/series`` with ``keys`` as filters: the series as attribute dicts."""
        try:
            found = self.client.search_for_series(search_filters=keys, fields=[*SERIES_KEYS, COUNT])
        except Exception as exc:  # requests' errors: the server is down or answered an error
            raise DeliveryError(f"QIDO-RS at {self.url}: {' '.join(str(exc).split())[:200]}") from exc
        series = []
        for item in found:  # the instance count too: a series still growing is not settled
            ds = Dataset.from_json(item)
            series.append(attributes_of(ds) | {COUNT: str(ds.get(COUNT, "") or "")})
        return series

    def instance_count(self, study: str, series: str) -> int:
        """How many instances the PACS holds of one series (QIDO-RS instances of it)."""
        try:
            return len(self.client.search_for_instances(study_instance_uid=study, series_instance_uid=series))
        except Exception as exc:
            raise DeliveryError(f"QIDO-RS at {self.url}: {' '.join(str(exc).split())[:200]}") from exc

    def fetch(self, study: str, series: str, spool: Path) -> Path:
        """WADO-RS of one series into ``<spool>/<series>/``; returns that folder."""
        try:
            datasets = self.client.retrieve_series(study, series)
        except Exception as exc:
            raise DeliveryError(f"WADO-RS of series {series}: {' '.join(str(exc).split())[:200]}") from exc
        if not datasets:
            raise DeliveryError(f"WADO-RS of series {series} returned no instance")
        for ds in datasets:
            save_instance(ds, spool)
        return spool / series

    def store(self, paths: list[Path]) -> None:
        """STOW-RS of the files; :class:`DeliveryError` unless the PACS takes every one."""
        datasets = [dcmread(str(p)) for p in paths]
        try:
            answer = self.client.store_instances(datasets)
        except Exception as exc:
            raise DeliveryError(f"STOW-RS to {self.url}: {' '.join(str(exc).split())[:200]}") from exc
        if answer.get("FailedSOPSequence"):  # Orthanc answers an empty one when all were stored
            raise DeliveryError(f"STOW-RS to {self.url}: {len(answer.FailedSOPSequence)} instance(s) refused")
