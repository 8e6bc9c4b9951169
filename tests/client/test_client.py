"""The client library and `lumireg register` against the real embedded server."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from tritonclient.utils import InferenceServerException

from lumireg.cli import main
from lumireg.client import InputError, LumiregError, RegistrationClient, ServerUnavailable
from lumireg.client.command import Pair, read_pairs
from lumireg.client.registration import default_outputs
from lumireg.contract import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from lumireg.evaluate import evaluate
from lumireg.export.repository import SOURCE_REPOSITORY
from lumireg.service.server import EmbeddedServer, free_ports
from lumireg.train.canvas import lumir_canvas

LUMIR_NAMES = ("LUMIRMRI_3455_0000.nii.gz", "LUMIRMRI_3456_0000.nii.gz", "LUMIRMRI_3457_0000.nii.gz")


@pytest.fixture(scope="module")
def lumir_files(pair, tmp_path_factory):
    """A LUMIR-style ground-truth folder: three images (and labels) and an evaluation config of two pairs."""
    root = tmp_path_factory.mktemp("lumir")
    affine = lumir_canvas().affine
    (root / "imagesVal").mkdir()
    (root / "labelsVal").mkdir()
    images = [pair["fixed"][0, 0], pair["moving"][0, 0], np.roll(pair["moving"][0, 0], 2, axis=1)]
    labels = [pair["moving_labels"][0, 0]] * 3
    for name, image, label in zip(LUMIR_NAMES, images, labels):
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesVal" / name))
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(root / "labelsVal" / name))
    pairs = [{"fixed": f"./imagesVal/{LUMIR_NAMES[0]}", "moving": f"./imagesVal/{LUMIR_NAMES[i]}"} for i in (1, 2)]
    config = {
        "name": "test",
        "expected_shape": [160, 224, 192, 3],
        "eval_pairs": pairs,
        "evaluation_methods": [
            {"name": "NDV", "metric": "ndv"},
            {"name": "Dice", "metric": "dice", "labels": [1, 2, 3]},
        ],
    }
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def shm_client(server):
    with RegistrationClient(server.grpc_url, transport="shm") as connection:
        yield connection


def test_lumir_round_trip(shm_client, lumir_files, in_process, served_voxels):
    fixed, moving = (lumir_files / "imagesVal" / n for n in LUMIR_NAMES[:2])
    result = shm_client.register(
        fixed, moving, ("displacement", "inverse_displacement", "warped", "qc"), precision="float32"
    )
    field = result.displacement.get_fdata(dtype=np.float32)
    assert field.shape == (160, 224, 192, 3)
    assert np.allclose(result.displacement.affine, nib.load(str(fixed)).affine)
    assert np.abs(np.moveaxis(field, -1, 0) - in_process["displacement"][0]).max() <= served_voxels
    inverse = np.moveaxis(result.inverse_displacement.get_fdata(dtype=np.float32), -1, 0)
    assert np.abs(inverse - in_process["inverse_displacement"][0]).max() <= served_voxels
    assert result.warped.shape == (160, 224, 192)
    from lumireg.evaluate import ndv_percent

    # the QC's NDV (the metric's torch path, on the service's field) is the evaluator's (its numpy path) on the
    # field returned, over the moving image's nonzero voxels
    moving_mask = np.asarray(nib.load(str(moving)).dataobj) > 0
    assert result.qc["ndv_percent"] == pytest.approx(ndv_percent(field, moving_mask), rel=1e-9, abs=1e-12)
    half = shm_client.register(fixed, moving, ("displacement",))  # float16 on the wire
    assert np.abs(half.displacement.get_fdata() - field).max() <= 2e-3 * max(1.0, np.abs(field).max())


def test_passes_reach_the_server(shm_client, lumir_files, in_process_two_passes):
    fixed, moving = (lumir_files / "imagesVal" / n for n in LUMIR_NAMES[:2])
    result = shm_client.register(fixed, moving, ("displacement", "qc"), precision="float32", passes=2)
    assert result.qc["passes"] == 2
    field = np.moveaxis(result.displacement.get_fdata(dtype=np.float32), -1, 0)
    # a cascade rounds the moving image to uint8 between passes: ONNX and PyTorch (1e-5 apart) may round a voxel to
    # neighbouring levels there, so a few voxels drift further than after one pass
    difference = np.abs(field - in_process_two_passes["displacement"][0])
    assert np.median(difference) <= 1e-4 and difference.max() <= 1e-2
    with pytest.raises(ValueError, match="passes"):
        shm_client.register(fixed, moving, ("displacement",), passes=0)


def test_shared_memory_and_grpc_payloads_give_identical_results(server, shm_client, pair):
    kwargs = dict(
        outputs=("displacement", "warped", "warped_labels"),
        moving_labels=pair["moving_labels"][0, 0],
        precision="float32",
    )
    via_shm = shm_client.register(pair["fixed"][0, 0], pair["moving"][0, 0], **kwargs)
    with RegistrationClient(server.grpc_url, transport="grpc") as plain:
        via_grpc = plain.register(pair["fixed"][0, 0], pair["moving"][0, 0], **kwargs)
    for name in kwargs["outputs"]:
        np.testing.assert_array_equal(
            np.asarray(getattr(via_shm, name).dataobj), np.asarray(getattr(via_grpc, name).dataobj)
        )
    assert via_shm.warped_labels.get_data_dtype() == np.int32


def _reoriented_clinical_image(image: np.ndarray, affine: np.ndarray):
    """The canvas image as a clinic might store it: 1.5 mm, LPS, cropped off-centre, float32."""
    zoomed = ndimage.zoom(image.astype(np.float32), 1 / 1.5, order=1)
    data = zoomed[::-1, ::-1][4:-2, 3:-5, 2:-6]
    # voxel v of the new grid is zoomed voxel (Z0-5-v0, Z1-4-v1, v2+2), i.e. canvas voxel ~1.5 times that
    flip = np.array([[-1, 0, 0, zoomed.shape[0] - 5], [0, -1, 0, zoomed.shape[1] - 4], [0, 0, 1, 2], [0, 0, 0, 1.0]])
    return data * 3.7 + 100, affine @ np.diag([1.5, 1.5, 1.5, 1.0]) @ flip


def test_non_lumir_input_comes_back_on_its_own_grid_and_a_known_warp_is_recovered(shm_client, pair, tmp_path):
    import ants

    canvas = lumir_canvas()
    fixed, affine = _reoriented_clinical_image(pair["fixed"][0, 0], canvas.affine)
    grid = np.indices(fixed.shape, dtype=np.float32)
    centre = np.array(fixed.shape, dtype=np.float32)[:, None, None, None] / 2
    # moving(y) = fixed(y + true(y)) with a smooth known field of about 1.3 voxels (2 mm) at most
    true = 1.3 * np.stack(
        [np.sin(np.pi * (grid[(a + 1) % 3] - centre[(a + 1) % 3]) / fixed.shape[(a + 1) % 3]) for a in range(3)]
    )
    moving = ndimage.map_coordinates(fixed, grid + true, order=1, mode="constant")
    # so the pull-back that brings moving back onto fixed is the inverse: d(x) = -true(x + d(x))
    expected = -true
    for _ in range(6):
        expected = -np.stack(
            [ndimage.map_coordinates(true[a], grid + expected, order=1, mode="nearest") for a in range(3)]
        )
    result = shm_client.register(
        fixed,
        moving,
        ("displacement", "warped", "qc"),
        fixed_affine=affine,
        moving_affine=affine,
        precision="float32",
        field_format="itk",
    )
    assert result.displacement.shape == (*fixed.shape, 3)
    np.testing.assert_allclose(result.displacement.affine, affine)
    found = np.moveaxis(result.displacement.get_fdata(dtype=np.float32), -1, 0)
    brain = ndimage.binary_erosion(fixed > 100 + 3.7 * 20, iterations=3)
    # measured: 0.51 voxel of 1.15 on average in the brain (the network, on a 1.5 mm image resampled to 1 mm)
    error = np.linalg.norm(found - expected, axis=0)[brain].mean()
    assert error < 0.6 * np.linalg.norm(expected, axis=0)[brain].mean(), error
    warped = result.warped.get_fdata()
    assert np.abs(warped - fixed)[brain].mean() < 0.7 * np.abs(moving - fixed)[brain].mean()
    # the ITK field, applied by ANTs, gives our warped image
    for name, image in (
        ("fixed", nib.Nifti1Image(fixed, affine)),
        ("moving", nib.Nifti1Image(moving, affine)),
        ("field", result.displacement_itk),
    ):
        nib.save(image, str(tmp_path / f"{name}.nii.gz"))
    by_ants = ants.apply_transforms(
        fixed=ants.image_read(str(tmp_path / "fixed.nii.gz")),
        moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
        transformlist=[str(tmp_path / "field.nii.gz")],
        interpolator="linear",
    ).numpy()
    assert np.abs(by_ants - warped)[brain].max() < 1e-2 * np.ptp(fixed)


def test_batch_writes_a_lumir_submission_that_evaluate_reads_and_resumes(server, lumir_files, tmp_path, capsys):
    out = tmp_path / "submission"
    command = [
        "register",
        "--pairs",
        str(lumir_files / "config.json"),
        "-o",
        str(out),
        "--lumir-submission",
        "--url",
        server.grpc_url,
        "--concurrency",
        "2",
    ]
    assert main(command) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["disp_3455_3456.nii.gz", "disp_3455_3457.nii.gz"]
    assert nib.load(str(out / files[0])).shape == (160, 224, 192, 3)
    report = evaluate(out, lumir_files, [lumir_files / "config.json"], progress=False)
    assert set(report["cases"]) == {"3455_0000<--3456_0000", "3455_0000<--3457_0000"}
    import torch

    from lumireg.evaluate import ndv_percent

    # each case's NDV is the metric's on the submitted field over the moving image's nonzero voxels, here
    # through the torch path, which the evaluator does not take; the aggregate is their mean
    ndvs = []
    for moving_name in LUMIR_NAMES[1:]:
        moving_id = moving_name.split("_")[1]
        field = torch.from_numpy(nib.load(str(out / f"disp_3455_{moving_id}.nii.gz")).get_fdata())
        moving = torch.from_numpy(np.asarray(nib.load(str(lumir_files / "imagesVal" / moving_name)).dataobj))
        ndvs.append(ndv_percent(field, moving))
        case = f"3455_0000<--{moving_id}_0000"
        assert report["cases"][case]["NDV"]["mean"] == pytest.approx(ndvs[-1], rel=1e-9, abs=1e-12), case
    assert report["aggregates"]["NDV"]["mean"] == pytest.approx(np.mean(ndvs), rel=1e-9, abs=1e-12)
    capsys.readouterr()
    assert main(command) == 0
    again = capsys.readouterr().out
    assert "registered 0 pair(s)" in again and "2 already done" in again
    fp16 = tmp_path / "fp16"
    assert main(command[:4] + [str(fp16)] + command[5:] + ["--fp16"]) == 0
    with np.load(fp16 / "disp_3455_3456.npz") as saved:
        assert saved["arr_0"].dtype == np.float16 and saved["arr_0"].shape == (160, 224, 192, 3)


def test_batch_survives_a_server_restart(lumir_files, tmp_path, capsys):
    ports = free_ports()
    log = tmp_path / "server.log"
    out = tmp_path / "out"
    command = [
        "register",
        "--pairs",
        str(lumir_files / "config.json"),
        "-o",
        str(out),
        "--url",
        f"127.0.0.1:{ports.grpc}",
        "--concurrency",
        "1",
        "--outputs",
        "displacement",
        "--retry-seconds",
        "120",
    ]
    server = EmbeddedServer(SOURCE_REPOSITORY, ports=ports, log=log).start()
    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(command)))
    try:
        worker.start()
        deadline = time.monotonic() + 120
        while not list(out.glob("*/displacement.nii.gz")) and time.monotonic() < deadline:
            time.sleep(0.2)
        server.stop()  # between the two pairs: the second must wait for the server to come back
        server = EmbeddedServer(SOURCE_REPOSITORY, ports=ports, log=log).start()
        worker.join(240)
    finally:
        server.stop()
    assert codes == [0], capsys.readouterr().err
    assert len(list(out.glob("*/displacement.nii.gz"))) == 2
    assert not list(out.rglob(".partial-*"))


def test_client_never_imports_torch(server, lumir_files):
    code = (
        "import sys\n"
        "from lumireg.client import RegistrationClient\n"
        f"with RegistrationClient({server.grpc_url!r}) as c:\n"
        f"    r = c.register({str(lumir_files / 'imagesVal' / LUMIR_NAMES[0])!r}, "
        f"{str(lumir_files / 'imagesVal' / LUMIR_NAMES[1])!r}, ('displacement',))\n"
        "print(r.displacement.shape, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(160, 224, 192, 3) []"


def test_server_refusals_carry_the_servers_message(shm_client, pair):
    with pytest.raises(LumiregError, match="server refused.*'fixed'.*UINT8"):
        shm_client.infer({"fixed": pair["fixed"].astype(np.float32), "moving": pair["moving"]}, ["displacement"])


@pytest.mark.parametrize("case", ["missing file", "4-D image", "empty image", "no server"])
def test_bad_input_gets_one_clear_line_and_leaves_nothing(case, server, lumir_files, tmp_path, capsys):
    fixed = lumir_files / "imagesVal" / LUMIR_NAMES[0]
    moving, url, code = lumir_files / "imagesVal" / LUMIR_NAMES[1], server.grpc_url, 2
    if case == "missing file":
        moving, expected = tmp_path / "nope.nii.gz", "no such file"
    elif case == "4-D image":
        moving, expected = tmp_path / "4d.nii.gz", "3-D volume is needed"
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), str(moving))
    elif case == "empty image":
        moving, expected = tmp_path / "empty.nii.gz", "empty"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(moving))
    else:
        url, code, expected = f"127.0.0.1:{free_ports().grpc}", 3, "no lumireg server answers"
    out = tmp_path / "out"
    assert main(["register", str(fixed), str(moving), "-o", str(out), "--url", url]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_labels_output_needs_labels(shm_client, pair):
    with pytest.raises(InputError, match="warped_labels needs moving_labels"):
        shm_client.register(pair["fixed"][0, 0], pair["moving"][0, 0], ("warped_labels",))


def test_shared_memory_regions_are_released_on_close(server, pair):
    def regions() -> set:
        return {p.name for p in Path("/dev/shm").glob("lumireg_*")}

    before = regions()
    client = RegistrationClient(server.grpc_url, transport="shm")
    client.register(pair["fixed"][0, 0], pair["moving"][0, 0], ("displacement",))
    assert len(regions() - before) == 2  # one input and one output region, reused by later requests
    client.register(pair["moving"][0, 0], pair["fixed"][0, 0], ("displacement",))
    assert len(regions() - before) == 2
    client.close()
    assert regions() == before


def test_labels_stored_as_floats_are_warped_as_integers(shm_client, pair):
    canvas = lumir_canvas()
    image, affine = _reoriented_clinical_image(pair["moving"][0, 0], canvas.affine)
    labels, _ = _reoriented_clinical_image(pair["moving_labels"][0, 0].astype(np.float32), canvas.affine)
    labels = np.rint((labels - 100) / 3.7).astype(np.float32)  # a label map saved as float32, as many tools do
    result = shm_client.register(
        image, image, ("warped_labels",), moving_labels=labels, fixed_affine=affine, moving_affine=affine
    )
    warped = np.asarray(result.warped_labels.dataobj)
    assert warped.dtype == np.int32 and warped.shape == labels.shape
    # an image registered to itself: the labels come back where they were, but for a few boundary voxels
    assert np.mean(warped == labels) > 0.97
    with pytest.raises(InputError, match="whole numbers"):
        shm_client.register(
            image, image, ("warped_labels",), moving_labels=labels + 0.25, fixed_affine=affine, moving_affine=affine
        )


def _nearest_warp(labels: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``labels`` pulled back by ``field`` ([X, Y, Z, 3], voxels) with nearest neighbour, zero outside."""
    grid = np.indices(labels.shape, dtype=np.float32) + np.moveaxis(field, -1, 0)
    return ndimage.map_coordinates(labels, grid, order=0, mode="constant")


def test_labels_given_are_warped_without_asking(server, lumir_files, tmp_path, capsys):
    fixed, moving = (lumir_files / "imagesVal" / n for n in LUMIR_NAMES[:2])
    labels = lumir_files / "labelsVal" / LUMIR_NAMES[1]
    out = tmp_path / "out"
    assert (
        main(
            [
                "register",
                str(fixed),
                str(moving),
                "--labels",
                str(labels),
                "-o",
                str(out),
                "--url",
                server.grpc_url,
                "--precision",
                "float32",
            ]
        )
        == EXIT_OK
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "displacement.nii.gz",
        "qc.json",
        "warped.nii.gz",
        "warped_labels.nii.gz",
    ]
    warped = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    original = np.asarray(nib.load(str(labels)).dataobj)
    assert warped.dtype == original.dtype and not np.array_equal(warped, original)
    field = nib.load(str(out / "displacement.nii.gz")).get_fdata(dtype=np.float32)
    assert np.mean(warped == _nearest_warp(original, field)) > 0.999  # but for ties at half a voxel
    assert "warped_labels:" in capsys.readouterr().out
    assert default_outputs(False) == ("displacement", "warped")  # the library adds labels the same way
    assert default_outputs(True) == ("displacement", "warped", "warped_labels")


@pytest.fixture
def labelled_dataset(lumir_files, tmp_path) -> Path:
    """A LUMIR dataset JSON (validation) whose first pair names its moving labels and whose second does not."""
    entries = [
        {
            "fixed": f"./imagesVal/{LUMIR_NAMES[0]}",
            "moving": f"./imagesVal/{LUMIR_NAMES[1]}",
            "fixed_label": f"./labelsVal/{LUMIR_NAMES[0]}",
            "moving_label": f"./labelsVal/{LUMIR_NAMES[1]}",
        },
        {"fixed": f"./imagesVal/{LUMIR_NAMES[0]}", "moving": f"./imagesVal/{LUMIR_NAMES[2]}"},
    ]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"name": "test", "validation": entries}))
    return path


def test_batch_warps_each_pairs_labels(server, lumir_files, labelled_dataset, tmp_path, capsys):
    out = tmp_path / "batch"
    command = [
        "register",
        "--pairs",
        str(labelled_dataset),
        "--data-dir",
        str(lumir_files),
        "-o",
        str(out),
        "--url",
        server.grpc_url,
        "--concurrency",
        "2",
        "--precision",
        "float32",
    ]
    assert main(command) == EXIT_OK, capsys.readouterr().err
    assert "registered 2 pair(s)" in capsys.readouterr().out
    with_labels, without = out / "disp_3455_3456", out / "disp_3455_3457"
    assert sorted(p.name for p in with_labels.iterdir()) == [
        "displacement.nii.gz",
        "qc.json",
        "warped.nii.gz",
        "warped_labels.nii.gz",
    ]
    assert sorted(p.name for p in without.iterdir()) == ["displacement.nii.gz", "qc.json", "warped.nii.gz"]
    warped = np.asarray(nib.load(str(with_labels / "warped_labels.nii.gz")).dataobj)
    original = np.asarray(nib.load(str(lumir_files / "labelsVal" / LUMIR_NAMES[1])).dataobj)
    field = nib.load(str(with_labels / "displacement.nii.gz")).get_fdata(dtype=np.float32)
    assert np.mean(warped == _nearest_warp(original, field)) > 0.999
    # asking for warped_labels when a pair names no labels is refused before anything runs
    refused = tmp_path / "refused"
    assert main(command[:6] + [str(refused)] + command[7:] + ["--outputs", "warped_labels"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 pair(s) name no moving labels" in err[0] and LUMIR_NAMES[2] in err[0], err
    assert not refused.exists()


def test_pairs_files_name_moving_labels(lumir_files, labelled_dataset, tmp_path):
    pairs = read_pairs(labelled_dataset, lumir_files)
    assert [p.moving_labels for p in pairs] == [lumir_files / f"./labelsVal/{LUMIR_NAMES[1]}", None]
    listing = tmp_path / "pairs.csv"
    listing.write_text(
        "fixed,moving,moving_labels\n# a comment\na.nii.gz, b.nii.gz, seg/b.nii.gz\nc.nii.gz,d.nii.gz,\n"
        "e.nii.gz,f.nii.gz\n"
    )
    assert read_pairs(listing, None) == [
        Pair(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "seg/b.nii.gz", "a.nii.gz", "b.nii.gz"),
        Pair(tmp_path / "c.nii.gz", tmp_path / "d.nii.gz", None, "c.nii.gz", "d.nii.gz"),
        Pair(tmp_path / "e.nii.gz", tmp_path / "f.nii.gz", None, "e.nii.gz", "f.nii.gz"),
    ]
    listing.write_text("a.nii.gz,b.nii.gz,c.nii.gz,d.nii.gz\n")
    with pytest.raises(ValueError, match="row 1"):
        read_pairs(listing, None)
    labelled_dataset.write_text(json.dumps({"validation": [{"fixed": "a.nii.gz", "moving_label": "b.nii.gz"}]}))
    with pytest.raises(ValueError, match="entry 0"):
        read_pairs(labelled_dataset, None)


def test_labels_option_is_for_one_pair(lumir_files, labelled_dataset, tmp_path, capsys):
    command = ["register", "--pairs", str(labelled_dataset), "--labels", "seg.nii.gz", "-o", str(tmp_path / "o")]
    assert main(command) == EXIT_USAGE
    assert "pairs file names each pair's labels" in capsys.readouterr().err


class _Refusing:
    """A transport whose every request fails with one gRPC status."""

    def __init__(self, status: str, message: str):
        self.status, self.message, self.calls, self.resets = status, message, 0, 0

    def infer(self, client, inputs, outputs, timeout, parameters=None):
        self.calls += 1
        raise InferenceServerException(self.message, status=self.status)

    def reset(self, client):
        self.resets += 1

    def close(self, client=None):
        pass


@pytest.mark.parametrize(
    "status",
    [
        "StatusCode.UNAVAILABLE",
        "StatusCode.NOT_FOUND",
        "StatusCode.INVALID_ARGUMENT",
        "StatusCode.INTERNAL",
        "StatusCode.DEADLINE_EXCEEDED",
    ],
)
def test_client_acts_on_the_status_not_the_message(status):
    # the words the client once matched, on every status: only the status may decide
    transport = _Refusing(status, "model 'lumireg' has no available versions; is not ready; shared memory region")
    with RegistrationClient(f"127.0.0.1:{free_ports().grpc}", transport="grpc", retry_seconds=1.2) as client:
        client.transport = transport
        expected = {"StatusCode.UNAVAILABLE": ServerUnavailable, "StatusCode.NOT_FOUND": ServerUnavailable}
        with pytest.raises(expected.get(status, LumiregError)) as raised:
            client.infer({"fixed": np.zeros((1, 1, 2, 2, 2), np.uint8)}, ["displacement"])
    if status in expected:  # retried with backoff (0.5 s, then 1 s is past the deadline), regions registered again
        assert transport.calls == 2 and transport.resets == 1
    else:
        assert type(raised.value) is LumiregError and transport.calls == 1 and transport.resets == 0
        assert ("did not answer" if status == "StatusCode.DEADLINE_EXCEEDED" else "server refused") in str(raised.value)


@pytest.mark.parametrize(
    "message",
    [
        "Stub process 'lumireg_0' is not healthy.",
        "lumireg: registration failed: lumireg_network: Stub process 'lumireg_network_0' is not healthy.",
    ],
)
def test_the_internal_of_a_dead_stub_is_retried(message):
    # the python backend's words for a model's process that died: lumireg serve restarts the server
    transport = _Refusing("StatusCode.INTERNAL", message)
    with RegistrationClient(f"127.0.0.1:{free_ports().grpc}", transport="grpc", retry_seconds=1.2) as client:
        client.transport = transport
        with pytest.raises(ServerUnavailable, match="is not healthy"):
            client.infer({"fixed": np.zeros((1, 1, 2, 2, 2), np.uint8)}, ["displacement"])
    assert transport.calls == 2 and transport.resets == 1


def test_server_refusals_carry_invalid_argument(shm_client, pair):
    with pytest.raises(LumiregError, match="'moving_labels' was not sent") as raised:
        shm_client.infer({"fixed": pair["fixed"], "moving": pair["moving"]}, ["warped_labels"])
    assert raised.value.__cause__.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("how", ["Ctrl-C", "SIGTERM"])
def test_interrupted_register_exits_130_with_one_line(how, server, lumir_files, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        if how == "Ctrl-C":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler interrupts this

    monkeypatch.setattr(RegistrationClient, "register", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    fixed, moving = (lumir_files / "imagesVal" / n for n in LUMIR_NAMES[:2])
    assert (
        main(["register", str(fixed), str(moving), "-o", str(tmp_path / "o"), "--url", server.grpc_url])
        == EXIT_INTERRUPTED
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0], err
    assert signal.getsignal(signal.SIGTERM) is before


FLAGGED_QC = {
    "ndv_percent": 0.0,
    "ncc_before": 0.30,
    "ncc_after": 0.20,
    "jacobian_min": 0.5,
    "warnings": [{"code": "similarity_decreased", "message": "worse than before registration"}],
}


@pytest.mark.parametrize("allow", [False, True])
def test_qc_warnings_are_printed_and_fail_the_command_unless_allowed(
    allow, server, lumir_files, tmp_path, capsys, monkeypatch
):
    from lumireg.client.registration import RegistrationResult
    from lumireg.contract import EXIT_FAILURE

    monkeypatch.setattr(RegistrationClient, "register", lambda *args, **kwargs: RegistrationResult(qc=FLAGGED_QC))
    fixed, moving = (lumir_files / "imagesVal" / n for n in LUMIR_NAMES[:2])
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"{fixed},{moving}\n{moving},{fixed}\n")
    allowing = ["--allow-warnings"] if allow else []
    one = ["register", str(fixed), str(moving), "-o", str(tmp_path / "one"), "--url", server.grpc_url, *allowing]
    assert main(one) == (EXIT_OK if allow else EXIT_FAILURE)
    err = capsys.readouterr().err
    assert "warning: similarity_decreased: worse than before registration" in err
    assert json.loads((tmp_path / "one" / "qc.json").read_text())["warnings"] == FLAGGED_QC["warnings"]
    batch = ["register", "--pairs", str(pairs), "-o", str(tmp_path / "batch"), "--url", server.grpc_url, *allowing]
    assert main(batch) == (EXIT_OK if allow else EXIT_FAILURE)
    captured = capsys.readouterr()
    assert "2 QC warning(s)" in captured.out and captured.err.count("similarity_decreased") == 2


@pytest.mark.parametrize(
    ("kind", "align", "sent"),
    [("clinical", None, "affine"), ("clinical", "none", "none"), ("lumir", None, None), ("lumir", "rigid", "rigid")],
)
def test_images_off_lumirs_canvas_are_sent_with_align_affine_unless_the_caller_says(pair, kind, align, sent):
    transport = _Refusing("StatusCode.INVALID_ARGUMENT", "stop here")
    seen = []
    refuse = transport.infer
    transport.infer = lambda client, inputs, outputs, timeout, parameters=None: (
        seen.append(parameters),
        refuse(client, inputs, outputs, timeout, parameters),
    )
    fixed, moving = pair["fixed"][0, 0], pair["moving"][0, 0]
    if kind == "clinical":  # float32 on the canvas's grid: not LUMIR's uint8 file, so it may sit in scanner pose
        fixed, moving = fixed.astype(np.float32), moving.astype(np.float32)
    with RegistrationClient(f"127.0.0.1:{free_ports().grpc}", transport="grpc") as client:
        client.transport = transport
        with pytest.raises(LumiregError):
            client.register(
                fixed, moving, ("displacement",), fixed_affine=np.eye(4), moving_affine=np.eye(4), align=align
            )
    assert (seen[0] or {}).get("align") == sent
