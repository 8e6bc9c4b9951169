"""lumireg pacs against a real Orthanc and the real embedded Triton server: DIMSE and DICOMweb, and failures."""

import logging
import subprocess
import threading
import time

import numpy as np
import pytest
from orthanc_server import NODE_AE, write_study

from lumireg.client import RegistrationClient
from lumireg.client.dicom import read_segmentation, read_series
from lumireg.pacs.command import _register_with, serve
from lumireg.pacs.dimse import DimsePacs, StoreSCP
from lumireg.pacs.journal import Journal
from lumireg.pacs.node import Node
from lumireg.pacs.rules import Rule

PARAMETERS = {"align": "none"}  # the pair shares one grid: no pre-alignment, the cheapest request


@pytest.fixture(scope="module")
def expected(server, small_pair):
    """The NIfTI path's result on the same pair: what the DICOM results must equal."""
    with RegistrationClient(server.grpc_url) as client:
        return client.register(
            small_pair["fixed"],
            small_pair["moving"],
            ("warped", "warped_labels"),
            moving_labels=small_pair["labels"],
            **PARAMETERS,
        )


@pytest.fixture(scope="module")
def registration(server):
    with RegistrationClient(server.grpc_url) as client:
        yield _register_with(client)


class Running:
    """A node (DIMSE, towards ``orthanc``) running its loop in a thread; ``stop()`` ends it as SIGTERM would."""

    def __init__(self, journal_dir, orthanc, registration, rules, destination=None, **options):
        self.node = Node(
            Journal(journal_dir),
            DimsePacs(NODE_AE, ("ORTHANC", "127.0.0.1", orthanc.dicom), destination),
            rules,
            registration,
            settle_seconds=1.0,
            **options,
        )
        self.scp = StoreSCP(
            NODE_AE, "127.0.0.1", orthanc.node_port, self.node.journal.spool, self.node.received, self.node.refused
        )
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=serve, args=(self.node, self.stopping), daemon=True)
        self.thread.start()

    def wait(self, series: str, state: str, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while self.node.journal.state_of(series) != state:
            assert time.monotonic() < deadline, f"series {series}: {self.node.journal.state_of(series)}, not {state}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)
        self.scp.close()
        self.node.journal.close()


def _metric(node, name, **labels) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


def check_results(orthanc, study, expected, tmp_path, instances_expected=None):
    """The derived series and the SEG that lumireg stored in the study: geometry, references, labels, validity."""
    derived = {s["Modality"]: s for s in orthanc.derived_series(study["study"])}
    assert set(derived) == {"MR", "SEG"}, derived
    fixed = read_series(study["fixed"])
    warped = read_series(orthanc.download_series(derived["MR"]["SeriesInstanceUID"], tmp_path / "warped"))
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-4)
    np.testing.assert_array_equal(warped.data, np.rint(np.asarray(expected.warped.dataobj)))
    moving_sops = {str(ds.SOPInstanceUID) for ds in read_series(study["moving"]).datasets}
    for ds in warped.datasets:
        assert {str(r.ReferencedSOPInstanceUID) for r in ds.SourceImageSequence} == moving_sops
        assert ds.FrameOfReferenceUID == fixed.first.FrameOfReferenceUID
        assert ds.StudyInstanceUID == study["study"] and ds.PatientName == fixed.first.PatientName
        assert ds.SeriesDescription.startswith("lumireg 0.1.0") and ds.ImageType[:2] == ["DERIVED", "SECONDARY"]
    seg_folder = orthanc.download_series(derived["SEG"]["SeriesInstanceUID"], tmp_path / "seg")
    labels, _, seg = read_segmentation(seg_folder, fixed.affine, fixed.data.shape)
    np.testing.assert_array_equal(labels, np.asarray(expected.warped_labels.dataobj))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == fixed.series_uid
    for path in [next(seg_folder.iterdir()), next((tmp_path / "warped").iterdir())]:
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert not [line for line in report.stderr.splitlines() if line.startswith("Error")], report.stderr
    if instances_expected is not None:
        assert derived["MR"]["Instances"] == instances_expected and derived["SEG"]["Instances"] == 1
    return derived


def test_dimse_a_series_routed_by_orthanc_comes_back_registered(
    orthanc, small_pair, expected, registration, tmp_path, caplog
):
    study = write_study(tmp_path / "study", small_pair, "DIMSE")
    for folder in ("fixed", "moving", "seg"):
        orthanc.upload(sorted(study[folder].iterdir()))
    rules = [
        Rule(
            "t1",
            {"SeriesDescription": "DIMSE follow-up"},
            fixed_match={"SeriesDescription": "DIMSE*"},
            parameters=PARAMETERS,
        )
    ]
    caplog.set_level(logging.INFO, logger="lumireg.pacs")
    node = Running(tmp_path / "journal", orthanc, registration, rules)
    try:
        seg_uid = (
            read_segmentation.__module__
            and __import__("pydicom").dcmread(str(next(study["seg"].iterdir()))).SeriesInstanceUID
        )
        ids = [orthanc.series_id(study["moving_uid"]), orthanc.series_id(str(seg_uid))]
        orthanc.rest("POST", "/modalities/lumireg/store", json={"Resources": ids, "Synchronous": True})
        node.wait(study["moving_uid"], "stored")
        assert _metric(node.node, "lumireg_pacs_studies_registered_total") == 1
        assert _metric(node.node, "lumireg_pacs_latency_seconds_count") == 1
    finally:
        node.stop()
    check_results(orthanc, study, expected, tmp_path, instances_expected=48)
    text = caplog.text
    assert study["moving_uid"] in text and "Doe" not in text and "PAT-0042" not in text
