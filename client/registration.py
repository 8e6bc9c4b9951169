"""``RegistrationClient``: NIfTI (or arrays) in, NIfTI images in the caller's own spaces out.

LUMIR images (160 x 224 x 192 uint8) go to the server as they are and the
server's outputs come back as they are. Any other image (size, spacing,
orientation, dtype, contrast) is brought onto the model's canvas by
:mod:`lumireg.client.geometry` (1 mm, RAS, centred on its centre of intensity mass,
robust-percentile intensities to 0..255); the displacement that comes back is
turned into a displacement on the fixed image's own grid (in its voxels), and
the warped image and labels are resampled from the caller's original moving
image (labels by nearest neighbour), not from the 8-bit copy.

Every result is in the fixed image's space with its affine and header: the
displacement in LUMIR's convention (``[X, Y, Z, 3]``, voxels, pull-back:
``warped(x) = moving(x + d(x))`` with both in the fixed grid's voxel
coordinates), and with ``field_format="itk"`` also the world-space field that
ANTs / ITK apply (``antsApplyTransforms -t displacement_itk.nii.gz``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lumireg.client import dicom as _dicom
from lumireg.client import endpoints, geometry
from lumireg.client.security import Credentials, diagnose, grpc_client, shared_memory_headers
from lumireg.client.transport import GrpcTransport, SharedMemoryTransport
from lumireg.contract import ACCESS_KEY_ENV, ACCESS_KEY_HEADER, ENTRY_MODEL, request_parameters

RESULT_OUTPUTS = ("displacement", "inverse_displacement", "warped", "warped_labels", "qc")
DEFAULT_OUTPUTS = ("displacement", "warped")  # and warped_labels when moving labels are given
FILES = {
    "displacement": "displacement.nii.gz",
    "inverse_displacement": "inverse_displacement.nii.gz",
    "warped": "warped.nii.gz",
    "warped_labels": "warped_labels.nii.gz",
    "qc": "qc.json",
    "displacement_itk": "displacement_itk.nii.gz",
}
# gRPC statuses (InferenceServerException.status()) that mean "no server to answer now", so a request is retried:
# UNAVAILABLE: nothing listens at the address, or the server says try again (its network model is not loaded);
# NOT_FOUND: a stopping or starting server has no loaded model 'lumireg', or a restarted one has forgotten the
# client's shared memory regions (registered again before the retry).
RETRY_STATUSES = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND"})
DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
UNAVAILABLE = "StatusCode.UNAVAILABLE"
# The one INTERNAL that is retried: Triton's python backend's words when the process running a model died
# ("Stub process 'lumireg_0' is not healthy."; from the network's stub, inside lumireg's message). Nothing was
# registered, and `lumireg serve` restarts the server, so the retries then meet UNAVAILABLE until it is back.
STUB_DIED = ("StatusCode.INTERNAL", "is not healthy")


def retried(status: str, message: str) -> bool:
    """Whether a request that failed with gRPC ``status`` (and ``message``) is sent again: :data:`RETRY_STATUSES`,
    or :data:`STUB_DIED`."""
    return status in RETRY_STATUSES or (status == STUB_DIED[0] and STUB_DIED[1] in message)


class LumiregError(RuntimeError):
    """A registration that could not be done; the message says why (the server's own words when it refused)."""


class InputError(LumiregError, ValueError):
    """An input image that cannot be registered (missing, unreadable, not 3-D, empty)."""


class OutputError(LumiregError, OSError):
    """A result file could not be written (disk full, no permission); nothing partial is left behind."""


class ServerUnavailable(LumiregError):
    """No server answered at the URL, even after retrying."""


class AccessDenied(LumiregError):
    """The server is up but refuses this client: no access key, a wrong one, or shared memory not allowed."""


@dataclass
class Image:
    """A caller's 3-D image: data as stored, voxel -> RAS mm affine, and the header to keep."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    dicom: object = None  # the DicomSeries (or, for labels, the SEG's segments) when read from DICOM


def load_image(source, what: str, affine: np.ndarray | None = None, series_uid: str | None = None) -> Image:
    """A path, a nibabel image or an array (with ``affine``; LUMIR-shaped uint8 arrays may omit it) -> Image.

    A DICOM series (a folder, a list of files, or one DICOM file) is read by :mod:`lumireg.client.dicom`, which
    places its slices by position and orientation; ``series_uid`` chooses one of several series in a folder.
    """
    if _dicom.is_dicom_source(source):
        try:
            series = _dicom.read_series(source, series_uid, what)
        except _dicom.DicomError as exc:
            raise InputError(f"{what}: {exc}" if not str(exc).startswith(what) else str(exc)) from exc
        image = load_image(series.data, what, series.affine)
        image.dicom = series
        return image
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{what}: no such file: {path}")
        try:
            source = nib.load(str(path))
            data = np.asanyarray(source.dataobj)
        except Exception as exc:
            reason = " ".join(str(exc).split())  # one line, whatever the reader's message holds
            raise InputError(f"{what}: cannot read {path} as a NIfTI image ({reason})") from exc
    if isinstance(source, nib.spatialimages.SpatialImage):
        data, affine, header = np.asanyarray(source.dataobj), source.affine, source.header
    else:
        data, header = np.asarray(source), None
    if data.size == 0:
        raise InputError(f"{what}: the image is empty (it has no voxels, shape {data.shape})")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{what}: a 3-D volume is needed, got an array of shape {data.shape}")
    if data.size == 0 or not np.any(data):
        raise InputError(f"{what}: the image is empty (every voxel is 0)")
    if affine is None:
        if not geometry.is_native(data):
            raise InputError(f"{what}: an array that is not a LUMIR image (160x224x192 uint8) needs its affine")
        affine = np.eye(4)
    return Image(data, np.asarray(affine, dtype=np.float64), header)


@dataclass
class RegistrationResult:
    """The outputs asked for, as nibabel images in the fixed image's space (None when not asked), and the QC dict."""

    displacement: nib.Nifti1Image | None = None
    inverse_displacement: nib.Nifti1Image | None = None  # in the moving image's space
    warped: nib.Nifti1Image | None = None
    warped_labels: nib.Nifti1Image | None = None
    displacement_itk: nib.Nifti1Image | None = None
    qc: dict | None = None
    seconds: dict = field(default_factory=dict)  # wall time: "server" (the request), "total"
    inputs: dict = field(default_factory=dict)  # the Images registered: "fixed", "moving", "moving_labels"

    def save(self, out_dir: str | Path, output_format: str = "nifti", uid_root: str | None = None) -> dict[str, Path]:
        """Write every output present to ``out_dir`` (:data:`FILES` names); each file appears whole or not at all.

        ``output_format="dicom"`` writes the warped image and labels as DICOM on a DICOM fixed image's series
        instead (:func:`lumireg.client.dicom_out.save`, new UIDs under ``uid_root``), the fields and QC as here.
        """
        if output_format == "dicom":
            from lumireg.client import dicom_out

            return dicom_out.save(self, out_dir, uid_root)
        if output_format != "nifti":
            raise ValueError(f"output_format must be 'nifti' or 'dicom', got {output_format!r}")
        return self._save_files(out_dir, FILES)

    def _save_files(self, out_dir: str | Path, files: dict[str, str]) -> dict[str, Path]:
        out_dir = Path(out_dir)
        written = {}
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
        for name, filename in files.items():
            value = getattr(self, name)
            if value is None:
                continue
            target = out_dir / filename
            partial = out_dir / f".partial-{os.getpid()}-{filename}"
            try:
                if name == "qc":
                    partial.write_text(json.dumps(value, indent=2) + "\n")
                else:
                    nib.save(value, str(partial))
                partial.replace(target)
            except OSError as exc:
                partial.unlink(missing_ok=True)  # files appear whole or not at all
                raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
            written[name] = target
        return written


def _on_canvas(image: Image, what: str):
    try:
        return geometry.to_canvas(image.data, image.affine)
    except ValueError as exc:
        raise InputError(f"{what}: {exc}") from exc


def _like(data: np.ndarray, image: Image) -> nib.Nifti1Image:
    header = image.header.copy() if isinstance(image.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(data, image.affine, header=header)
    out.set_data_dtype(data.dtype)
    out.header.set_qform(image.affine, code=1)
    out.header.set_sform(image.affine, code=1)
    return out


def _channels_last(disp: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(disp.astype(np.float32), 0, -1))


class RegistrationClient:
    """A connection to a lumireg server.

    Args:
        url: the server's gRPC endpoint, ``host:port``; several servers as ``host:port,host:port,...``,
            or a DNS name that resolves to several (:mod:`lumireg.client.endpoints`): requests then rotate
            over the servers that are up (gRPC's ``round_robin``), and one that fails is retried on another.
        transport: ``"auto"`` (system shared memory when the url is one server on this
            machine's loopback, else gRPC payloads), ``"shm"`` or ``"grpc"``.
        timeout: seconds one request may take before it fails.
        retry_seconds: how long to keep retrying, with exponential backoff,
            while the server is unavailable (restarting, not up yet).
        concurrency: requests this client may have in flight at once (threads).
        credentials: TLS files and the access key (:class:`lumireg.client.security.Credentials`); None: plaintext,
            no key.
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        transport: str = "auto",
        timeout: float = 600.0,
        retry_seconds: float = 60.0,
        concurrency: int = 1,
        credentials: Credentials | None = None,
    ):
        self.endpoints = endpoints.parse(url)
        if transport == "auto":
            transport = "shm" if self.endpoints.loopback else "grpc"
        if transport not in ("shm", "grpc"):
            raise ValueError(f"transport must be 'auto', 'shm' or 'grpc', got {transport!r}")
        if transport == "shm" and self.endpoints.several:
            raise ValueError(f"shared memory needs one server on this host; {url!r} names several: use grpc")
        self.url, self.timeout, self.retry_seconds = url, timeout, retry_seconds
        self.credentials = credentials or Credentials()
        self.credentials.check()
        self.transport_name = transport
        self.client = self._connect(self.endpoints.target, self.endpoints.several)
        self.transport = (
            SharedMemoryTransport(concurrency, headers=shared_memory_headers(url))
            if transport == "shm"
            else GrpcTransport()
        )

    def __enter__(self) -> RegistrationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the shared memory regions and the connection."""
        self.transport.close(self.client)
        self.client.close()

    def _connect(self, target: str, several: bool) -> grpcclient.InferenceServerClient:
        """A tritonclient client for ``target`` with lumireg's channel arguments (a list of addresses checks the
        servers' TLS certificates against the first host listed)."""
        name = endpoints.split(self.endpoints.servers[0])[0] if several and self.credentials.uses_tls else None
        return grpc_client(target, self.credentials, endpoints.channel_args(name))

    def ready(self) -> bool:
        """True when the server and its ``lumireg`` model are ready to answer."""
        try:
            return self.client.is_server_ready() and self.client.is_model_ready(ENTRY_MODEL)
        except InferenceServerException:
            return False

    def unreachable_reason(self) -> str:
        """A phrase on why nothing answers at the URL (TLS on one side only, an untrusted certificate, a missing
        client certificate; :func:`lumireg.client.security.diagnose`; the first server's reason of several), or ""."""
        return next(filter(None, (diagnose(server, self.credentials) for server in self.endpoints.each())), "")

    def access_problem(self) -> str | None:
        """Why a server that is up (its open health endpoint says ready) refuses this client, or None.

        Told apart by gRPC status, not by message: Triton answers a call without the header a restricted protocol
        needs with UNAVAILABLE, as it does a full queue; the metadata call (restricted like inference, unaffected
        by the queue) failing with UNAVAILABLE while health says ready means the access key. The message names
        the header and the options, never a key. With several servers each is asked on a connection of its own
        (both calls must reach the same server), and the first refusal is returned.
        """
        servers = self.endpoints.each()
        if len(servers) == 1:
            return self._access_problem(self.client, self.url)
        for server in servers:
            client = self._connect(server, several=True)
            try:
                problem = self._access_problem(client, server)
            finally:
                client.close()
            if problem:
                return problem
        return None

    def _access_problem(self, client, url: str) -> str | None:
        try:
            if not client.is_server_ready(client_timeout=10):
                return None
        except InferenceServerException:
            return None
        try:
            client.get_server_metadata(client_timeout=10)
        except InferenceServerException as exc:
            if exc.status() != UNAVAILABLE:
                return None
            if self.credentials.access_key:
                return (
                    f"the server at {url} refused this client's access key (header {ACCESS_KEY_HEADER}); "
                    f"check --access-key-file or ${ACCESS_KEY_ENV}"
                )
            return (
                f"the server at {url} needs an access key (header {ACCESS_KEY_HEADER}): "
                f"give --access-key-file FILE or set ${ACCESS_KEY_ENV}"
            )
        if self.transport_name == "shm":
            headers = self.transport.headers
            try:
                client.get_system_shared_memory_status(headers=dict(headers or {}), client_timeout=10)
            except InferenceServerException as exc:
                if exc.status() == UNAVAILABLE:
                    return (
                        f"the server at {url} does not let this client use shared memory (it listens beyond "
                        "loopback and its local secret is not readable here): use --transport grpc"
                    )
        return None

    def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str], parameters: dict | None = None
    ) -> dict[str, np.ndarray]:
        """One request of the wire contract (batch axis included), retried while the server is unavailable.

        ``parameters``: request parameters (:data:`lumireg.contract.PARAMETERS`); None sends none (server defaults).

        What happens is decided by the request's gRPC status, and by its message
        only for a model's dead stub (:func:`retried`): :data:`RETRY_STATUSES`
        and :data:`STUB_DIED` are retried with exponential backoff (0.5 s
        doubling to 5 s) for ``retry_seconds``, shared memory regions
        registered again before each retry; ``DEADLINE_EXCEEDED`` raises
        :class:`LumiregError` (``timeout``); any other status is a refusal
        (:class:`LumiregError` with the server's message).
        """
        deadline = time.monotonic() + self.retry_seconds
        delay, reset = 0.5, False
        while True:
            try:
                if reset:
                    self.transport.reset(self.client)
                    reset = False
                return self.transport.infer(self.client, inputs, outputs, self.timeout, parameters)
            except InferenceServerException as exc:
                status, message = exc.status(), exc.message() or str(exc)
                if status == DEADLINE_EXCEEDED:
                    raise LumiregError(f"the server at {self.url} did not answer within {self.timeout:g} s") from exc
                if not retried(status, message):
                    raise LumiregError(f"the server refused the request: {message}") from exc
                refused = self.access_problem() if status == UNAVAILABLE else None
                if refused:
                    raise AccessDenied(refused) from exc
                if time.monotonic() + delay > deadline:
                    raise ServerUnavailable(
                        f"no lumireg server answered at {self.url} (retried for {self.retry_seconds:g} s): {message}"
                    ) from exc
                time.sleep(delay)
                delay, reset = min(2 * delay, 5.0), True

    def register(
        self,
        fixed,
        moving,
        outputs=None,
        moving_labels=None,
        *,
        fixed_affine=None,
        moving_affine=None,
        precision: str = "float16",
        field_format: str = "lumir",
        passes: int | None = None,
        coarse: int | None = None,
        refine: int | None = None,
        similarity: str | None = None,
        contrast: str | None = None,
        align: str | None = None,
        fixed_series: str | None = None,
        moving_series: str | None = None,
    ) -> RegistrationResult:
        """Register ``moving`` onto ``fixed``.

        Args:
            fixed, moving: NIfTI paths, DICOM series (folders, lists of files, a multi-frame file), nibabel
                images, or 3-D arrays with ``fixed_affine`` / ``moving_affine`` ((4, 4) voxel -> RAS mm).
            outputs: any of :data:`RESULT_OUTPUTS`; None (the default):
                ``displacement`` and ``warped``, and ``warped_labels`` when
                ``moving_labels`` is given (see :func:`default_outputs`).
            moving_labels: a label map on the moving image's grid (path, image
                or array of whole numbers, or a DICOM SEG drawn on the moving series: its segment numbers);
                needed for ``warped_labels``.
            precision: ``"float16"`` (half the bytes on the wire) or
                ``"float32"`` for the displacement fields.
            field_format: ``"lumir"``, or ``"itk"`` to also get ``displacement_itk``.
            passes: network passes (request parameter ``passes``, 1..4); None: the server's default.
            coarse: 1 for a half-resolution network pass first, 0 for none (request parameter ``coarse``);
                None: the server's default.
            refine: instance optimisation steps on the server (request parameter ``refine``,
                0..:data:`~lumireg.contract.MAX_REFINE_STEPS`); None: the server's default.
            similarity: refinement's similarity, ``"ncc"`` (local NCC; across contrasts on the moving image
                mapped to the fixed image's contrast) or ``"mi"``; None: the server's default.
            contrast: ``"same"``, or ``"other"`` when the two images have different contrasts
                (T1 and T2, FLAIR), or ``"auto"`` (the server tells T1 against T2 apart by the images'
                brain intensity correlation); None: the server's default (auto).
            align: affine pre-alignment on the server, ``"none"``, ``"rigid"`` or ``"affine"``; None:
                ``"affine"`` when either image did not arrive on LUMIR's canvas (not uint8 of exactly
                160 x 224 x 192: it may sit in scanner pose), else the server's default (none).
            fixed_series, moving_series: the Series Instance UID to read when a DICOM folder holds several.

        Returns:
            a :class:`RegistrationResult` holding the outputs asked for, each
            on its image's own grid (the fixed image's; the inverse field on
            the moving image's), with that image's affine and header.

        Raises:
            InputError: an input cannot be registered. LumiregError: the server
            refused (its message included). ServerUnavailable: no server.
        """
        start = time.perf_counter()
        given = {
            "passes": passes,
            "coarse": coarse,
            "refine": refine,
            "similarity": similarity,
            "contrast": contrast,
            "align": align,
        }
        given = {name: value for name, value in given.items() if value is not None}
        # checked here so a bad value fails before any image is read; only the given ones are sent
        parameters = {name: request_parameters(given)[name] for name in given} or None
        if outputs is None:
            outputs = default_outputs(moving_labels is not None)
        outputs = _checked_outputs(outputs, precision, field_format, moving_labels is not None)
        placed = _place(
            load_image(fixed, "fixed", fixed_affine, fixed_series),
            load_image(moving, "moving", moving_affine, moving_series),
            moving_labels,
        )
        if align is None and not placed.native:
            parameters = {**(parameters or {}), "align": "affine"}  # a scan in scanner pose: align it first
        inputs, wire = _request(placed, outputs, precision)
        sent = time.perf_counter()
        answer = self.infer(inputs, wire, parameters)
        result = RegistrationResult(seconds={"server": time.perf_counter() - sent})
        result.inputs = {"fixed": placed.fixed, "moving": placed.moving, "moving_labels": placed.labels}
        _reassemble(result, answer, placed, outputs, precision, field_format)
        result.seconds["total"] = time.perf_counter() - start
        return result


# --- the steps of RegistrationClient.register --------------------------------------------------------------


def default_outputs(has_labels: bool, base=DEFAULT_OUTPUTS) -> tuple[str, ...]:
    """``base`` outputs, plus ``warped_labels`` when the caller gave moving labels (labels given are never ignored)."""
    return tuple(base) + (("warped_labels",) if has_labels and "warped_labels" not in base else ())


def _checked_outputs(outputs, precision: str, field_format: str, has_labels: bool) -> set[str]:
    """The outputs to make: ``outputs`` checked against :data:`RESULT_OUTPUTS` and the options, plus
    ``displacement`` when ``field_format="itk"`` (the ITK field is made from it).

    Raises ``ValueError`` for an unknown output, precision or format; :class:`InputError` for
    ``warped_labels`` without labels.
    """
    outputs = set(outputs)
    unknown = outputs - set(RESULT_OUTPUTS)
    if unknown or precision not in ("float16", "float32") or field_format not in ("lumir", "itk"):
        raise ValueError(
            f"outputs must be among {RESULT_OUTPUTS} (got {sorted(unknown)}), precision "
            f"float16|float32 (got {precision!r}), field_format lumir|itk (got {field_format!r})"
        )
    if "warped_labels" in outputs and not has_labels:
        raise InputError("warped_labels needs moving_labels")
    if field_format == "itk":
        outputs.add("displacement")
    return outputs


def _load_labels(source, moving: Image) -> Image:
    """The moving image's label map as integers: on the moving image's grid (its affine when ``source`` is an
    array), whole-number floats (as many tools save label maps) turned to int32; :class:`InputError` otherwise."""
    if _dicom.is_dicom_source(source):
        try:
            data, segments, _ = _dicom.read_segmentation(source, moving.affine, moving.data.shape)
        except _dicom.DicomError as exc:
            raise InputError(str(exc)) from exc
        if not data.any():
            raise InputError("moving_labels: the segmentation is empty (no segment covers a voxel)")
        return Image(data, moving.affine, None, segments)
    labels = load_image(source, "moving_labels", moving.affine)
    if labels.data.shape != moving.data.shape:
        raise InputError(
            f"moving_labels: shape {labels.data.shape} differs from the moving image's {moving.data.shape}"
        )
    if not np.issubdtype(labels.data.dtype, np.integer):
        if not np.array_equal(labels.data, np.round(labels.data)):
            raise InputError(
                f"moving_labels: values must be whole numbers (a label map), got {labels.data.dtype} with fractions"
            )
        labels.data = labels.data.astype(np.int32)
    info = np.iinfo(np.int32)
    if labels.data.size and (labels.data.min() < info.min or labels.data.max() > info.max):
        raise InputError(
            f"moving_labels: label values must fit in 32 bits ({info.min}..{info.max}), "
            f"got {labels.data.min()}..{labels.data.max()}"
        )
    return labels


@dataclass
class _Placed:
    """A pair as it goes to the server: the caller's images, their uint8 canvases (160, 224, 192) and placements.

    ``native``: both are LUMIR images sent as they are, so the server's outputs are already on their grids.
    """

    fixed: Image
    moving: Image
    labels: Image | None
    fixed_canvas: np.ndarray
    moving_canvas: np.ndarray
    fixed_place: geometry.Placement
    moving_place: geometry.Placement

    @property
    def native(self) -> bool:
        return self.fixed_place.native and self.moving_place.native


def _place(fixed: Image, moving: Image, moving_labels) -> _Placed:
    """Both images onto the canvas (:func:`lumireg.client.geometry.to_canvas`), the labels loaded beside them."""
    labels = _load_labels(moving_labels, moving) if moving_labels is not None else None
    (fixed_canvas, fixed_place), (moving_canvas, moving_place) = (
        _on_canvas(image, what) for image, what in ((fixed, "fixed"), (moving, "moving"))
    )
    return _Placed(fixed, moving, labels, fixed_canvas, moving_canvas, fixed_place, moving_place)


def _field_name(precision: str) -> str:
    """The wire output that carries the displacement: float16 (``displacement_fp16``) or float32."""
    return "displacement_fp16" if precision == "float16" else "displacement"


def _request(placed: _Placed, outputs: set[str], precision: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The request's inputs (``(1, 1, 160, 224, 192)`` each) and the wire outputs to ask for.

    The displacement always comes back (every other output is made from it on
    this side); the warped image and labels come from the server only for
    LUMIR images, where its warping is exact, and are resampled here from the
    caller's originals otherwise.
    """
    wire = [_field_name(precision)] + [n for n in ("inverse_displacement", "qc") if n in outputs]
    inputs = {"fixed": placed.fixed_canvas[None, None], "moving": placed.moving_canvas[None, None]}
    if placed.native:
        wire += [n for n in ("warped", "warped_labels") if n in outputs]
        if "warped_labels" in outputs:
            inputs["moving_labels"] = placed.labels.data.astype(np.int32)[None, None]
    return inputs, wire


def _reassemble(
    result: RegistrationResult,
    answer: dict[str, np.ndarray],
    placed: _Placed,
    outputs: set[str],
    precision: str,
    field_format: str,
) -> None:
    """Fill ``result`` from the server's ``answer``: every field on its image's own grid (voxels, pull-back),
    the warped images on the fixed grid with the fixed image's affine and header, labels in their own dtype."""
    fixed, moving = placed.fixed, placed.moving
    disp = answer[_field_name(precision)][0].astype(np.float32)
    if not placed.native:
        disp = geometry.field_to_fixed_grid(disp, placed.fixed_place, placed.moving_place)
    if "displacement" in outputs:
        result.displacement = _like(_channels_last(disp), fixed)
    if field_format == "itk":
        result.displacement_itk = geometry.itk_image(disp, fixed.affine, fixed.header)
    if "inverse_displacement" in outputs:
        inverse = answer["inverse_displacement"][0]
        if not placed.native:
            inverse = geometry.field_to_fixed_grid(inverse, placed.moving_place, placed.fixed_place)
        result.inverse_displacement = _like(_channels_last(inverse), moving)
    for name, source in (("warped", moving), ("warped_labels", placed.labels)):
        if name in outputs:
            if placed.native:
                data = answer[name][0, 0]
            else:
                data = geometry.warp_to_fixed(
                    source.data, disp, placed.fixed_place, placed.moving_place, labels=name == "warped_labels"
                )
            if name == "warped_labels":
                data = data.astype(source.data.dtype)
            setattr(result, name, _like(np.ascontiguousarray(data), fixed))
    if "qc" in outputs:
        result.qc = json.loads(answer["qc"].reshape(-1)[0])
