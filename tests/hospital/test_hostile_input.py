"""Hostile and broken input, on the real embedded server and in `lumireg register`: a clear refusal or a defined
result every time, and the server stays ready. (Wrong dtypes, shapes, a missing input and batch > 8 are pinned in
tests/service/test_server.py; the client's 4-D, missing and empty images in tests/client/test_client.py.)"""

import gzip
import json

import grpc
import nibabel as nib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from lumireg.cli import main
from lumireg.client import geometry
from lumireg.client.registration import InputError, load_image
from lumireg.client.transport import payload_inputs
from lumireg.contract import CANVAS, EXIT_OK, EXIT_USAGE


def infer(client, arrays, outputs=("displacement_fp16",), parameters=None):
    requested = [grpcclient.InferRequestedOutput(o) for o in outputs]
    return client.infer("lumireg", payload_inputs(arrays), outputs=requested, parameters=parameters)


def refused(client, server, arrays, outputs=("displacement_fp16",), parameters=None) -> str:
    with pytest.raises(InferenceServerException) as error:
        infer(client, arrays, outputs, parameters)
    assert server.ready() and client.is_model_ready("lumireg")
    message = error.value.message()
    assert len(message) < 2000, len(message)  # a refusal never echoes a large input back
    return message


# --- server side ---------------------------------------------------------------------------------------------


def test_batch_zero_is_refused(client, server, pair):
    empty = np.zeros((0, 1, *CANVAS), np.uint8)
    assert refused(client, server, {"fixed": empty, "moving": empty})


def test_an_unknown_output_is_refused_by_name(client, server, pair):
    message = refused(client, server, {"fixed": pair["fixed"], "moving": pair["moving"]}, ("displacement", "nope"))
    assert "nope" in message


@pytest.mark.parametrize("value", ["", "x" * 1000, "x" * 100_000], ids=["empty", "1 kB", "100 kB"])
def test_empty_or_oversized_string_parameters_are_refused(client, server, pair, value):
    with pytest.raises(InferenceServerException) as error:
        infer(client, {"fixed": pair["fixed"], "moving": pair["moving"]}, parameters={"similarity": value})
    status, message = error.value.status(), error.value.message()
    # past its limit gRPC itself may refuse the request before lumireg sees it
    assert status == "StatusCode.INVALID_ARGUMENT" or (
        len(value) > 10_000 and status == "StatusCode.RESOURCE_EXHAUSTED"
    )
    if status == "StatusCode.INVALID_ARGUMENT":
        assert "similarity" in message and len(message) < 500  # the value is not echoed whole
    assert server.ready() and client.is_model_ready("lumireg")


def test_malformed_raw_grpc_is_refused_and_the_server_stays_ready(client, server, pair):
    """Bytes that are not a request, and a well-formed request whose tensor bytes do not match its shape."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\x00 this is not a protobuf \x13\x37" * 10, timeout=60)
        assert garbage.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
        request = service_pb2.ModelInferRequest(model_name="lumireg")
        for name in ("fixed", "moving"):
            tensor = request.inputs.add(name=name, datatype="UINT8", shape=[1, 1, *CANVAS])
            assert tensor.name == name
            request.raw_input_contents.append(b"\x00" * 1000)  # far fewer bytes than the shape says
        infer_call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as short:
            infer_call(request, timeout=60)
        assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT, short.value.details()
    assert server.ready() and client.is_model_ready("lumireg")


@pytest.mark.parametrize("value", [0, 117], ids=["all zero", "constant"])
def test_a_constant_pair_gets_the_identity_and_a_warning_not_nan(client, server, value):
    image = np.full((1, 1, *CANVAS), value, np.uint8)
    result = infer(client, {"fixed": image, "moving": image}, ("displacement", "qc"))
    field = result.as_numpy("displacement")
    assert np.isfinite(field).all()
    assert np.abs(field).max() < 0.5  # nothing to register: about the identity
    qc = json.loads(result.as_numpy("qc")[0, 0])
    assert all(np.isfinite(v) for v in qc.values() if isinstance(v, float)), qc
    assert [w["code"] for w in qc["warnings"]] == ["empty_image"]
    assert (qc["ndv_percent"] is None) == (value == 0)  # no moving voxel to count folds over: undefined
    assert server.ready()


# --- client side: `lumireg register` exits 2 with one line naming the file and the problem, writes nothing -----


def _save(path, data, affine=None, dtype=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine, dtype=dtype), str(path))
    return path


def _singular(tmp_path, pair):
    """A header whose sform (the affine readers use) has a zero row: nibabel will not write one, so patch it."""
    raw = bytearray(gzip.decompress(_save(tmp_path / "ok.nii.gz", pair["moving"][0, 0]).read_bytes()))
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    raw[312:328] = np.zeros(4, "<f4").tobytes()  # srow_z = 0
    flat = tmp_path / "flat.nii.gz"
    flat.write_bytes(gzip.compress(bytes(raw)))
    return flat, "singular"


def _truncated(tmp_path, pair):
    whole = _save(tmp_path / "whole.nii.gz", pair["moving"][0, 0])
    cut = tmp_path / "truncated.nii.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut, "cannot read"


def _lying_header(tmp_path, pair):
    raw = bytearray(gzip.decompress(_save(tmp_path / "small.nii.gz", np.ones((8, 8, 8), np.float32)).read_bytes()))
    raw[42:48] = np.array([64, 64, 64], "<i2").tobytes()  # dim[1..3]: says 64^3, holds 8^3
    liar = tmp_path / "lying.nii.gz"
    liar.write_bytes(gzip.compress(bytes(raw)))
    return liar, "cannot read"


CASES = {
    "truncated .nii.gz": _truncated,
    "header lies about its size": _lying_header,
    "all NaN": lambda t, p: (_save(t / "nan.nii.gz", np.full((20, 20, 20), np.nan, np.float32)), "no finite"),
    "all inf": lambda t, p: (_save(t / "inf.nii.gz", np.full((20, 20, 20), np.inf, np.float32)), "no finite"),
    "2-D image": lambda t, p: (_save(t / "2d.nii.gz", np.ones((30, 30), np.float32)), "3-D"),
    "4-D image": lambda t, p: (_save(t / "4d.nii.gz", np.ones((8, 8, 8, 3), np.float32)), "3-D"),
    "singular affine": _singular,
    "zero voxels": lambda t, p: (_save(t / "zero.nii.gz", np.zeros((0, 10, 10), np.float32)), "no voxels"),
    "constant": lambda t, p: (_save(t / "constant.nii.gz", np.full((20, 20, 20), 5, np.float32)), "constant"),
}


@pytest.fixture
def lumir_inputs(lumir_pair_files):
    return lumir_pair_files


def _register_exits_2(args, capsys, out, *names):
    assert main(["register", *map(str, args), "-o", str(out)]) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert all(name in lines[0] for name in names), lines[0]
    assert not out.exists() or not any(out.rglob("*"))
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_a_broken_moving_image_exits_2_naming_it(case, server, lumir_inputs, pair, tmp_path, capsys):
    moving, words = CASES[case](tmp_path, pair)
    line = _register_exits_2([lumir_inputs[0], moving, "--url", server.grpc_url], capsys, tmp_path / "out", "moving")
    assert words in line, line
    if "cannot read" in words:
        assert moving.name in line


def test_labels_beyond_32_bits_exit_2(server, lumir_inputs, pair, tmp_path, capsys):
    labels = pair["moving_labels"][0, 0].astype(np.int64)
    labels[0, 0, 0] = 2**31 + 5
    path = _save(tmp_path / "labels.nii.gz", labels, dtype=np.int64)
    args = [*lumir_inputs, "--labels", path, "--url", server.grpc_url]
    assert "32 bits" in _register_exits_2(args, capsys, tmp_path / "out", "moving_labels")


def test_partly_non_finite_voxels_count_as_zero(server, lumir_inputs, pair, tmp_path, capsys):
    data = pair["moving"][0, 0].astype(np.float32)
    data[:10] = np.nan
    data[-10:] = np.inf
    moving = _save(tmp_path / "holes.nii.gz", data)
    out = tmp_path / "out"
    assert main(["register", str(lumir_inputs[0]), str(moving), "-o", str(out), "--url", server.grpc_url]) == EXIT_OK
    assert np.isfinite(nib.load(str(out / "displacement.nii.gz")).get_fdata()).all()


@pytest.mark.parametrize(
    "rows,words",
    [
        ("{f}\n", "expected rows fixed,moving"),
        ("{f},{m}\n{f},{m}\n", "would both write"),
        ("{f},{m},{m},{m}\n", "expected rows fixed,moving"),
    ],
    ids=["missing column", "duplicate output names", "extra columns"],
)
def test_a_bad_pairs_file_exits_2(rows, words, server, lumir_inputs, tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(rows.format(f=lumir_inputs[0], m=lumir_inputs[1]))
    line = _register_exits_2(["--pairs", pairs, "--url", server.grpc_url], capsys, tmp_path / "out", "pairs.csv")
    assert words in line, line


def test_an_output_folder_that_cannot_be_made_exits_2_before_sending(server, lumir_inputs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    line = _register_exits_2([*lumir_inputs, "--url", server.grpc_url], capsys, blocker / "out", "a-file")
    assert "not a folder" in line


# --- property-based: the client's geometry and input checks ---------------------------------------------------

finite_floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    dtype=st.sampled_from([np.uint8, np.int16, np.int32, np.float32, np.float64]),
    values=st.sampled_from(["random", "constant", "nan", "inf"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_load_image_accepts_a_3d_image_with_content_or_refuses_with_input_error(shape, dtype, values, seed):
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 100).astype(dtype)
    if values == "constant":
        data[...] = 3
    elif values in ("nan", "inf") and np.issubdtype(dtype, np.floating) and data.size:
        data.flat[0] = np.nan if values == "nan" else np.inf
    try:
        image = load_image(data, "moving", np.eye(4))
    except InputError as error:
        assert str(error).startswith("moving: ")
        squeezed = data
        while squeezed.ndim > 3 and squeezed.shape[-1] == 1:
            squeezed = squeezed[..., 0]
        assert squeezed.ndim != 3 or squeezed.size == 0 or not np.any(squeezed)
        return
    assert image.data.ndim == 3 and image.data.size > 0


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(*[st.integers(4, 12)] * 3),
    matrix=st.lists(finite_floats, min_size=9, max_size=9),
    offset=st.lists(finite_floats, min_size=3, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_to_canvas_gives_uint8_on_the_canvas_or_a_value_error(shape, matrix, offset, seed):
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(matrix, (3, 3))
    affine[:3, 3] = offset
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    try:
        canvas, placement = geometry.to_canvas(data, affine)
    except ValueError as error:
        assert "affine" in str(error) or "constant" in str(error)
        return
    assert canvas.shape == CANVAS and canvas.dtype == np.uint8
    assert np.isfinite(placement.canvas_affine).all()
    assert abs(np.linalg.det(affine[:3, :3])) > 0
