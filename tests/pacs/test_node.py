"""lumireg pacs against a real Orthanc and the real embedded Triton server: DIMSE and DICOMweb, and failures."""

import logging
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from dicom_series import write_series
from orthanc_server import AFFINE, NODE_AE, write_study
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import BasicTextSRStorage, Verification

from lumireg.client import RegistrationClient
from lumireg.client.dicom import read_segmentation, read_series
from lumireg.pacs.command import _register_with, serve
from lumireg.pacs.dimse import DimsePacs, StoreSCP
from lumireg.pacs.journal import Journal
from lumireg.pacs.node import Node
from lumireg.pacs.rules import Rule
from lumireg.service.server import free_ports

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


def _push(orthanc, *series_uids) -> None:
    """Orthanc's REST API sends series to the node (C-STORE), as a PACS router would."""
    ids = [orthanc.series_id(uid) for uid in series_uids]
    orthanc.rest("POST", "/modalities/lumireg/store", json={"Resources": ids, "Synchronous": True})


def test_results_due_while_the_pacs_is_down_are_kept_reported_and_stored_once_after_a_restart(
    orthanc, small_pair, registration, tmp_path, caplog
):
    study = write_study(tmp_path / "study", small_pair, "DOWN", with_seg=False)
    for folder in ("fixed", "moving"):
        orthanc.upload(sorted(study[folder].iterdir()))
    rules = [
        Rule(
            "t1",
            {"SeriesDescription": "DOWN follow-up"},
            fixed_match={"SeriesDescription": "DOWN*"},
            parameters=PARAMETERS,
        )
    ]
    journal, moving = tmp_path / "journal", study["moving_uid"]
    caplog.set_level(logging.INFO, logger="lumireg.pacs")
    down = ("ORTHANC", "127.0.0.1", free_ports().grpc)  # nothing listens there: the destination is down
    node = Running(
        journal,
        orthanc,
        registration,
        rules,
        destination=down,
        store_attempts=2,
        retry_seconds=0.2,
        resend_seconds=3600,
    )
    try:
        _push(orthanc, moving)
        deadline = time.monotonic() + 180
        while _metric(node.node, "lumireg_pacs_store_failures_total") < 1:
            assert time.monotonic() < deadline, node.node.journal.state_of(moving)
            time.sleep(0.2)
        assert node.node.journal.state_of(moving) == "registered"  # kept, not given up
        assert len(list((journal / "outbox" / moving).rglob("*.dcm"))) == 48
    finally:
        node.stop()
    assert "results not stored after 2 attempts" in caplog.text
    assert orthanc.derived_series(study["study"]) == []
    node = Running(journal, orthanc, registration, rules)  # restarted, the PACS reachable: stored
    try:
        node.wait(moving, "stored")
    finally:
        node.stop()
    first = orthanc.derived_series(study["study"])
    assert [(s["Modality"], s["Instances"]) for s in first] == [("MR", 48)]
    assert not (journal / "outbox" / moving).exists()
    # a node that died after storing but before journalling it redoes the work: the same UIDs, one copy in the PACS
    again = Journal(journal)
    again.update_work(moving, state="pending")
    again.close()
    node = Running(journal, orthanc, registration, rules)
    try:
        node.wait(moving, "stored")
    finally:
        node.stop()
    assert orthanc.derived_series(study["study"]) == first


def test_refused_objects_and_a_study_of_one_series_leave_the_node_running(
    orthanc, small_pair, registration, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="lumireg.pacs")
    rules = [Rule("t1", {"SeriesDescription": "LONE*"}, parameters=PARAMETERS)]
    node = Running(tmp_path / "journal", orthanc, registration, rules)
    try:
        scu = AE("MODALITY")
        for context in (BasicTextSRStorage, MRImageStorage, Verification):
            scu.add_requested_context(context)
        assoc = scu.associate("127.0.0.1", orthanc.node_port, ae_title=NODE_AE)
        assert assoc.is_established
        report = Dataset()
        report.SOPClassUID, report.SOPInstanceUID = BasicTextSRStorage, generate_uid()
        report.StudyInstanceUID, report.SeriesInstanceUID, report.Modality = generate_uid(), generate_uid(), "SR"
        report.file_meta = FileMetaDataset()
        report.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        broken = dcmread(str(sorted(write_series(tmp_path / "x", np.ones((4, 4, 2), np.int16), AFFINE))[0]))
        del broken.PixelData, broken.ImagePositionPatient
        assert assoc.send_c_store(report).Status == 0x0122  # SOP class not supported
        assert assoc.send_c_store(broken).Status == 0xA900  # data set does not match the SOP class
        assert assoc.send_c_echo().Status == 0x0000  # still answering
        assoc.release()
        assert _metric(node.node, "lumireg_pacs_instances_refused_total") == 2
        assert f"instance {report.SOPInstanceUID} refused" in caplog.text
        assert f"instance {broken.SOPInstanceUID} refused: missing PixelData, ImagePositionPatient" in caplog.text
        # a study with one series: nothing to register it onto; failed with the reason, the node goes on
        lone = tmp_path / "lone"
        moving = np.asarray(__import__("nibabel").load(str(small_pair["moving"])).dataobj)
        paths = write_series(lone, moving, AFFINE, description="LONE follow-up")
        orthanc.upload(paths)
        uid = str(dcmread(str(paths[0])).SeriesInstanceUID)
        _push(orthanc, uid)
        node.wait(uid, "failed")
        assert _metric(node.node, "lumireg_pacs_studies_failed_total", reason="no fixed series") == 1
        assert f"series {uid}: failed (no fixed series)" in caplog.text
        assert node.thread.is_alive() and node.scp.server.socket.fileno() != -1
    finally:
        node.stop()


def test_dicomweb_the_node_finds_fetches_and_stores_through_orthanc(orthanc, server, small_pair, expected, tmp_path):
    study = write_study(tmp_path / "study", small_pair, "WEB")
    for folder in ("fixed", "moving", "seg"):
        orthanc.upload(sorted(study[folder].iterdir()))
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rules]]\nname = "web"\nmoving = { SeriesDescription = "WEB follow-up" }\n'
        'fixed = "previous"\nfixed_match = { SeriesDescription = "WEB*" }\nparameters = { align = "none" }\n'
    )
    metrics = free_ports().grpc
    command = [
        sys.executable,
        "-m",
        "lumireg",
        "pacs",
        "--rules",
        str(rules),
        "--journal",
        str(tmp_path / "j"),
        "--dicomweb",
        orthanc.dicomweb,
        "--poll-seconds",
        "1",
        "--settle-seconds",
        "1",
        "--url",
        server.grpc_url,
        "--metrics-port",
        str(metrics),
    ]
    log = tmp_path / "node.log"
    with log.open("w") as handle:
        process = subprocess.Popen(command, stderr=handle, stdout=handle)
    try:
        deadline, text = time.monotonic() + 240, ""
        while "lumireg_pacs_studies_registered_total 1.0" not in text:  # counted once STOW-RS took every instance
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
            try:
                text = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
            except requests.ConnectionError:
                text = ""
        assert "lumireg_pacs_studies_failed_total{" not in text  # no failure of any reason
    finally:
        process.terminate()
        assert process.wait(60) == 0
    check_results(orthanc, study, expected, tmp_path, instances_expected=48)
    text = log.read_text()
    assert study["moving_uid"] in text and "Doe" not in text and "PAT-0042" not in text


def test_register_cli_reads_dicom_and_writes_dicom_equal_to_the_nifti_path(server, small_pair, expected, tmp_path):
    from lumireg.cli import main

    study = write_study(tmp_path / "study", small_pair, "CLI")
    out = tmp_path / "out"
    command = ["register", str(study["fixed"]), str(study["moving"]), "--labels", str(study["seg"]), "-o", str(out)]
    assert main([*command, "--output-format", "dicom", "--align", "none", "--url", server.grpc_url]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["displacement.nii.gz", "qc.json", "warped", "warped_labels"]
    fixed = read_series(study["fixed"])
    warped = read_series(out / "warped")
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-4)
    np.testing.assert_array_equal(warped.data, np.rint(np.asarray(expected.warped.dataobj)))
    labels, _, _ = read_segmentation(out / "warped_labels", fixed.affine, fixed.data.shape)
    np.testing.assert_array_equal(labels, np.asarray(expected.warped_labels.dataobj))
    first = sorted(p.name for p in (out / "warped").iterdir())
    assert main([*command, "--output-format", "dicom", "--align", "none", "--url", server.grpc_url]) == 0
    assert sorted(p.name for p in (out / "warped").iterdir()) == first  # the same registration, the same UIDs
    nifti_fixed = main(
        [
            "register",
            str(small_pair["fixed"]),
            str(study["moving"]),
            "-o",
            str(tmp_path / "x"),
            "--output-format",
            "dicom",
            "--url",
            server.grpc_url,
            "--align",
            "none",
        ]
    )
    assert nifti_fixed == 2  # DICOM output needs a DICOM fixed image
