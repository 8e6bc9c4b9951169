"""A real Orthanc (the distribution's package) with a throw-away configuration on free loopback ports, and the
small DICOM studies the PACS tests send through it."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "client"))  # dicom_series.py (pytest runs in importlib mode)

from dicom_series import study_attributes, write_series  # noqa: E402

from lumireg.service.server import free_ports  # noqa: E402

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
NODE_AE = "LUMIREG"
# 4 mm voxels of the test pair (40 x 56 x 48): small series, a full registration on the model's canvas
AFFINE = np.array([[-4.0, 0, 0, 80.0], [0, -4.0, 0, 110.0], [0, 0, 4.0, -90.0], [0, 0, 0, 1]])


class Orthanc:
    """A running Orthanc: ``rest(method, path, ...)``, ``upload(paths)``, ``stop()`` / ``start()``."""

    def __init__(self, root: Path):
        ports, node = free_ports(), free_ports()
        self.http, self.dicom, self.node_port = ports.grpc, ports.http, node.grpc
        self.root, self.process = root, None
        self.url, self.dicomweb = f"http://127.0.0.1:{self.http}", f"http://127.0.0.1:{self.http}/dicom-web"
        config = {
            "Name": "lumireg-test",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"lumireg": [NODE_AE, "127.0.0.1", self.node_port]},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(config))

    def start(self) -> "Orthanc":
        import requests

        log = (self.root / "orthanc.log").open("a")
        self.process = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not start; see {self.root / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def rest(self, method: str, path: str, **kwargs):
        import requests

        answer = requests.request(method, f"{self.url}{path}", timeout=60, **kwargs)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def upload(self, paths) -> None:
        for path in paths:
            self.rest("POST", "/instances", data=Path(path).read_bytes())

    def series_id(self, series_uid: str) -> str:
        return self.rest("POST", "/tools/lookup", data=series_uid)[0]["ID"]

    def download_series(self, series_uid: str, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for instance in self.rest("GET", f"/series/{self.series_id(series_uid)}/instances"):
            (folder / f"{instance['ID']}.dcm").write_bytes(self._bytes(f"/instances/{instance['ID']}/file"))
        return folder

    def _bytes(self, path: str) -> bytes:
        import requests

        return requests.get(f"{self.url}{path}", timeout=60).content

    def derived_series(self, study_uid: str) -> list[dict]:
        """The series of a study that lumireg wrote, as Orthanc's MainDicomTags plus ``Instances`` (a count)."""
        study = self.rest("POST", "/tools/lookup", data=study_uid)[0]["ID"]
        out = []
        for series in self.rest("GET", f"/studies/{study}/series"):
            tags = series["MainDicomTags"]
            if tags.get("SeriesDescription", "").startswith("lumireg"):
                out.append(tags | {"Instances": len(series["Instances"])})
        return out


def write_study(root: Path, small_pair: dict, description: str, with_seg: bool = True) -> dict:
    """A study of the small pair: fixed series at 08:00, moving at 09:00 (and a SEG of its labels), same patient.

    Returns the folders and the UIDs (``fixed``, ``moving``, ``seg`` paths; ``study``, ``fixed_uid``, ``moving_uid``).
    """
    from lumireg.client.dicom import read_series
    from lumireg.client.dicom_out import segmentation

    study = study_attributes()
    data = {k: np.asarray(nib.load(str(small_pair[k])).dataobj) for k in small_pair}
    write_series(
        root / "fixed",
        data["fixed"],
        AFFINE,
        study=study,
        series_time="080000",
        description=f"{description} base",
    )
    write_series(
        root / "moving",
        data["moving"],
        AFFINE,
        study=study,
        series_time="090000",
        description=f"{description} follow-up",
        series_number=2,
    )
    out = {"study": study["StudyInstanceUID"], "fixed": root / "fixed", "moving": root / "moving"}
    out["fixed_uid"], out["moving_uid"] = (read_series(root / k).series_uid for k in ("fixed", "moving"))
    if with_seg:
        moving = read_series(root / "moving")
        seg = segmentation(data["labels"].astype(np.int32), moving, None, None, f"input {moving.series_uid}")
        seg.SeriesDescription = "labels"
        (root / "seg").mkdir()
        seg.save_as(str(root / "seg" / "seg.dcm"))
        out["seg"] = root / "seg"
    return out
