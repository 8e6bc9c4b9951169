"""The served model against the in-process computation, on the real embedded server (gRPC)."""

import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lumireg.benchmarks.serving import scrape, total
from lumireg.client.transport import payload_inputs
from lumireg.contract import DEFAULT_COARSE, DEFAULT_PASSES, OUTPUT_NAMES
from lumireg.evaluate.metrics import as_channels_last, jacobian_determinant, ndv_percent
from lumireg.kernels import warp
from lumireg.network.refine import LEARNING_RATES


def infer(client, outputs, parameters=None, **arrays):
    requested = [grpcclient.InferRequestedOutput(o) for o in outputs]
    return client.infer("lumireg", payload_inputs(arrays), outputs=requested, parameters=parameters)


def returned(result) -> set:
    return {output.name for output in result.get_response().outputs}


@pytest.fixture(scope="module")
def full(client, pair):
    """One request asking for every output, with labels."""
    return infer(client, OUTPUT_NAMES, **pair)


def test_health_endpoints(server, client):
    assert server.live() and server.ready()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lumireg")


def test_displacement_equals_in_process_pytorch(full, in_process, served_voxels):
    for name in ("displacement", "inverse_displacement"):
        field = full.as_numpy(name)
        assert field.shape == (1, 3, 160, 224, 192) and field.dtype == np.float32
        assert np.abs(field - in_process[name]).max() <= served_voxels, name
    assert np.abs(in_process["displacement"]).max() > 0.5  # a real deformation, not the identity
    half = full.as_numpy("displacement_fp16")
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, full.as_numpy("displacement").astype(np.float16))


def test_warped_outputs_follow_the_returned_field(full, pair):
    disp = torch.from_numpy(full.as_numpy("displacement").copy())
    expected = warp(torch.from_numpy(pair["moving"]).float(), disp).numpy()
    assert np.abs(full.as_numpy("warped") - expected).max() <= 1e-3
    labels = warp(torch.from_numpy(pair["moving_labels"]), disp, mode="nearest").numpy()
    warped_labels = full.as_numpy("warped_labels")
    assert warped_labels.dtype == np.int32
    assert np.mean(warped_labels != labels) < 1e-5  # nearest neighbour: equal but for ties at exactly half a voxel


def test_qc_report_matches_the_evaluator(full, pair):
    qc = json.loads(full.as_numpy("qc")[0, 0])
    assert set(qc) == {
        "ndv_percent",
        "jacobian_min",
        "ncc_before",
        "ncc_after",
        "mi_before",
        "mi_after",
        "passes",
        "coarse",
        "refinement",
        "contrast",
        "warnings",
        "model",
        "version",
    }
    assert (qc["contrast"]["requested"], qc["contrast"]["used"]) == ("auto", "same")  # a pair of one contrast
    assert qc["warnings"] == [] and qc["refinement"] is None and qc["mi_after"] > qc["mi_before"]
    assert qc["passes"] == DEFAULT_PASSES and qc["coarse"] == DEFAULT_COARSE
    field = as_channels_last(full.as_numpy("displacement")[0])
    assert qc["ndv_percent"] == pytest.approx(ndv_percent(field, pair["moving"][0, 0]), abs=1e-9)
    assert qc["jacobian_min"] == pytest.approx(float(jacobian_determinant(field).min()), rel=1e-9)
    assert 0 <= qc["ncc_before"] < qc["ncc_after"] <= 1.0001  # registration made the images more alike
    assert "lumireg-default" in qc["model"]


def test_only_requested_outputs_come_back(client, pair):
    result = infer(client, ["displacement_fp16"], fixed=pair["fixed"], moving=pair["moving"])
    assert returned(result) == {"displacement_fp16"}


def test_no_outputs_named_gives_all_that_can_be_made(client, pair):
    result = client.infer("lumireg", payload_inputs(dict(fixed=pair["fixed"], moving=pair["moving"])))
    assert returned(result) == set(OUTPUT_NAMES) - {"warped_labels"}


def test_batched_and_concurrent_requests_keep_their_pairs(client, pair, in_process_one_pass, served_voxels):
    """Two pairs in one request, and two requests in flight (the dynamic batcher may merge them); one pass and
    no coarse pass, where swapping the images gives exactly the inverse."""
    in_process = in_process_one_pass
    one_pass = {"passes": 1, "coarse": 0}
    swapped = {
        "fixed": np.concatenate([pair["fixed"], pair["moving"]]),
        "moving": np.concatenate([pair["moving"], pair["fixed"]]),
    }
    batch = infer(client, ["displacement"], one_pass, **swapped).as_numpy("displacement")
    assert batch.shape == (2, 3, 160, 224, 192)
    assert np.abs(batch[:1] - in_process["displacement"]).max() <= served_voxels
    assert np.abs(batch[1:] - in_process["inverse_displacement"]).max() <= served_voxels  # swapping the images inverts

    results, pending = {}, []
    for name, (f, m) in {
        "forward": (pair["fixed"], pair["moving"]),
        "swapped": (pair["moving"], pair["fixed"]),
    }.items():
        callback = lambda result, error, name=name: results.__setitem__(name, (result, error))  # noqa: E731
        pending.append(
            client.async_infer(
                "lumireg",
                payload_inputs(dict(fixed=f, moving=m)),
                callback,
                outputs=[grpcclient.InferRequestedOutput("displacement")],
                parameters=one_pass,
            )
        )
    import time

    deadline = time.monotonic() + 120
    while len(results) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(error is None for _, error in results.values())
    assert np.abs(results["forward"][0].as_numpy("displacement") - in_process["displacement"]).max() <= served_voxels
    assert (
        np.abs(results["swapped"][0].as_numpy("displacement") - in_process["inverse_displacement"]).max()
        <= served_voxels
    )


def test_passes_parameter_chooses_the_cascade(client, pair, in_process_two_passes, in_process):
    cascade = infer(client, ["displacement", "qc"], {"passes": 2}, fixed=pair["fixed"], moving=pair["moving"])
    # between passes the moving image is resampled to uint8: where ONNX and PyTorch (1e-5 apart) round a voxel to
    # neighbouring levels, the next pass sees a one-level difference, so a cascade drifts more than one pass
    difference = np.abs(cascade.as_numpy("displacement") - in_process_two_passes["displacement"])
    assert np.median(difference) <= 1e-4 and difference.max() <= 1e-2
    assert json.loads(cascade.as_numpy("qc")[0, 0])["passes"] == 2
    assert np.abs(in_process_two_passes["displacement"] - in_process["displacement"]).max() > 0.1  # passes matter


def test_refine_parameter_refines_the_networks_answer_on_the_server(client, pair, in_process):
    parameters = {"refine": 2, "similarity": "ncc"}
    refined = infer(client, ["displacement", "qc"], parameters, fixed=pair["fixed"], moving=pair["moving"])
    record = json.loads(refined.as_numpy("qc")[0, 0])["refinement"]
    assert record["steps"] == 2 and record["similarity"] == "ncc" and record["converged"]
    assert record["after"] > record["before"]
    expected = _in_process_refined(pair, 2)
    difference = np.abs(refined.as_numpy("displacement") - expected)
    # ONNX vs PyTorch network (1e-5 apart), then two Adam steps: Adam's first steps move every element of the
    # update grid by about the learning rate whatever its gradient's size (the trilinear upsampling onto the velocity
    # moves no voxel further), so where a gradient is near 0 the two can step opposite ways; a few voxels may differ
    # by up to 2 steps x 2 x the NCC's learning rate (half-resolution voxels), no more
    assert np.median(difference) <= 1e-3 and np.quantile(difference, 0.999) <= 1e-2
    assert difference.max() <= 2 * 2 * LEARNING_RATES["ncc"] * 2  # full-resolution voxels
    assert np.abs(expected - in_process["displacement"]).max() > 0.05  # refinement moved the field


def _in_process_refined(pair, steps: int) -> np.ndarray:
    """The bundled network in PyTorch, its velocity refined ``steps`` steps as the server does."""
    from lumireg.export.onnx import VelocityGraph
    from lumireg.network.cascade import cascade
    from lumireg.network.checkpoint import load_model
    from lumireg.network.refine import refine

    fixed, moving = (torch.from_numpy(pair[k]) for k in ("fixed", "moving"))
    with torch.no_grad():
        return cascade(
            VelocityGraph(load_model()),
            fixed,
            moving,
            1,
            refine_last=lambda f, m, v: refine(v, f, m, steps)[0],
            coarse=DEFAULT_COARSE,
        )[0].numpy()


@pytest.mark.parametrize(
    "parameters,words",
    [
        ({"passes": 0}, ["passes", "1..4"]),
        ({"passes": 9}, ["passes", "1..4"]),
        ({"passes": "two"}, ["passes", "int"]),
        ({"pases": 2}, ["pases"]),
        ({"refine": 201}, ["refine", "0..200"]),
        ({"refine": -1}, ["refine", "0..200"]),
        ({"similarity": "ssd"}, ["similarity", "ncc | mi"]),
    ],
)
def test_bad_parameters_are_refused_with_invalid_argument(client, server, pair, parameters, words):
    with pytest.raises(InferenceServerException) as error:
        infer(client, ["displacement_fp16"], parameters, fixed=pair["fixed"], moving=pair["moving"])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert all(word in error.value.message() for word in words), error.value.message()
    assert server.ready()


BAD_REQUESTS = {
    "wrong dtype": (
        lambda p: dict(fixed=p["fixed"].astype(np.float32), moving=p["moving"]),
        ["displacement"],
        ["fixed", "UINT8"],
    ),
    "wrong shape": (
        lambda p: dict(fixed=p["fixed"][:, :, :80], moving=p["moving"]),
        ["displacement"],
        ["fixed", "[-1,1,160,224,192]"],
    ),
    "missing input": (lambda p: dict(fixed=p["fixed"]), ["displacement"], ["moving"]),
    "labels output without labels": (
        lambda p: dict(fixed=p["fixed"], moving=p["moving"]),
        ["warped_labels"],
        ["moving_labels", "warped_labels"],
    ),
    "wrong label dtype": (
        lambda p: dict(fixed=p["fixed"], moving=p["moving"], moving_labels=p["moving"]),
        ["warped_labels"],
        ["moving_labels", "INT32"],
    ),
    "batch over the limit": (
        lambda p: dict(fixed=np.repeat(p["fixed"], 9, 0), moving=np.repeat(p["moving"], 9, 0)),
        ["displacement"],
        ["batch", "8"],
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_a_clear_error_and_the_server_stays_ready(client, server, pair, case):
    make, outputs, words = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as error:
        infer(client, outputs, **make(pair))
    message = error.value.message()
    assert all(word in message.replace(" ", "") or word in message for word in words), message
    assert server.ready() and client.is_model_ready("lumireg")
    small = infer(client, ["displacement_fp16"], fixed=pair["fixed"], moving=pair["moving"])
    assert small.as_numpy("displacement_fp16").shape == (1, 3, 160, 224, 192)


def test_metrics_hold_triton_and_lumireg_families(client, server, pair):
    before = scrape(server.metrics_url)
    infer(client, ["displacement", "qc"], fixed=pair["fixed"], moving=pair["moving"])
    after = scrape(server.metrics_url)
    assert (
        total(after, "nv_inference_request_success_total", model="lumireg")
        == total(before, "nv_inference_request_success_total", model="lumireg") + 1
    )
    assert total(after, "lumireg_pairs_total") == total(before, "lumireg_pairs_total") + 1
    assert total(after, "lumireg_ndv_percent_count") == total(before, "lumireg_ndv_percent_count") + 1
    for stage in ("network", "integrate", "warp", "qc", "total"):
        count = total(after, "lumireg_stage_seconds_count", stage=stage)
        assert count == total(before, "lumireg_stage_seconds_count", stage=stage) + 1, stage
        assert total(after, "lumireg_stage_seconds_sum", stage=stage) > total(
            before, "lumireg_stage_seconds_sum", stage=stage
        )


def test_align_affine_returns_the_whole_transform_of_a_posed_moving_image(client, pair):
    from lumireg.export.onnx import VelocityGraph
    from lumireg.network import align
    from lumireg.network.checkpoint import load_model
    from lumireg.service.pipeline import register_in_process

    # the moving image in scanner pose: turned 20 degrees about the axis k through the canvas centre, shifted 15 mm
    angle, centre = np.radians(20), (np.array(pair["moving"].shape[2:]) - 1) / 2
    pose = np.eye(4)
    pose[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    pose[:3, 3] = centre + [15.0, 0.0, 0.0] - pose[:3, :3] @ centre
    moving = align.resample(torch.from_numpy(pair["moving"]), torch.tensor(pose, dtype=torch.float32)[None]).numpy()
    served = infer(client, OUTPUT_NAMES, {"align": "affine"}, fixed=pair["fixed"], moving=moving)
    assert returned(served) == set(OUTPUT_NAMES) - {"warped_labels"}
    for name, channels in (("displacement", 3), ("inverse_displacement", 3), ("warped", 1)):
        assert served.as_numpy(name).shape == (1, channels, 160, 224, 192) and np.isfinite(served.as_numpy(name)).all()
    qc = json.loads(served.as_numpy("qc")[0, 0])
    assert qc["alignment"]["converged"] and qc["alignment"]["angle_degrees"] == pytest.approx(20, abs=3)
    graph = VelocityGraph(load_model())

    def network(fixed, moving):
        with torch.no_grad():
            return graph(fixed, moving)

    expected = register_in_process(network, pair["fixed"], moving, ["displacement"], align="affine")["displacement"]
    difference = np.abs(served.as_numpy("displacement") - expected.numpy())
    assert np.median(difference) <= 1e-3 and difference.max() <= 0.05  # ONNX vs PyTorch network, one alignment
    # the whole transform: the posed image warped back lies on the fixed image as the unposed one does
    unposed = infer(client, ["warped"], fixed=pair["fixed"], moving=pair["moving"]).as_numpy("warped")
    plain = infer(client, ["warped"], fixed=pair["fixed"], moving=moving).as_numpy("warped")
    assert np.abs(served.as_numpy("warped") - unposed).mean() < 0.3 * np.abs(plain - unposed).mean()
