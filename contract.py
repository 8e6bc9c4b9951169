"""lumireg's contract: every fact that more than one folder relies on, in one place.

Plain constants and tiny pure functions; importing this module imports
neither torch nor numpy, so the light client install (numpy, nibabel,
tritonclient) and the server share it. Folders import facts from here, never
from each other.

Conventions (LUMIR's): a volume is the NIfTI data array as stored, axes
(i, j, k); tensors are ``(B, C, D, H, W)`` with D, H, W = i, j, k. A
displacement is ``(B, 3, D, H, W)`` float32 in **voxels**, channel c along
array axis c, pull-back from the fixed grid (``warped(x) = moving(x + u(x))``),
trilinear, voxel centres at integer coordinates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# --- the canvas: LUMIR's grid -------------------------------------------------------------------------
CANVAS = (160, 224, 192)  # voxels along i, j, k
CANVAS_SPACING_MM = 1.0
CANVAS_ORIENTATION = ("R", "A", "S")  # array axes i, j, k point right, anterior, superior (the template's)
HALF_CANVAS = tuple(n // 2 for n in CANVAS)  # the network's velocity grid
SIZE_MULTIPLE = 16  # every spatial size the network takes divides by this (four halvings)

# --- the transform --------------------------------------------------------------------------------------
INTEGRATION_STEPS = 7  # scaling and squaring: v / 2**7, then 7 times u <- u + warp(u, u)
NCC_WINDOW = 9  # voxels per side of the local NCC window (training loss and QC)
# the same ~9 mm on half-resolution images (2 mm voxels): refinement and the QC's NCC
HALF_NCC_WINDOW = NCC_WINDOW // 2 + 1


def check_size_multiple(shape, what: str = "volume") -> None:
    """``ValueError`` unless every size in ``shape`` (voxels) is a positive multiple of :data:`SIZE_MULTIPLE`."""
    sizes = tuple(int(s) for s in shape)
    if not sizes or any(s <= 0 or s % SIZE_MULTIPLE for s in sizes):
        raise ValueError(f"{what}: spatial sizes must be positive multiples of {SIZE_MULTIPLE}, got {sizes}")


# --- intensities ------------------------------------------------------------------------------------------
def intensities_to_uint8(unit):
    """LUMIR's 8-bit intensities from intensities in 0..1: ``rint(clip(x, 0, 1) * 255)`` as uint8.

    ``unit``: any real array-like (a CPU tensor too), any shape; values outside
    0..1 saturate, halves round to even (``numpy.rint``); NaN must not occur.
    Returns a numpy ``uint8`` array of the same shape, 0..255. The network
    input is this divided by 255. numpy is imported on the first call, so the
    contract itself stays numpy-free.
    """
    import numpy as np

    return np.rint(np.clip(np.asarray(unit), 0, 1) * 255).astype(np.uint8)


# --- LUMIR's file names -----------------------------------------------------------------------------------
_LUMIR_IMAGE = re.compile(r"_(\d{4})_(\d{4})\.nii\.gz$")  # LUMIRMRI_{ID}_{modality}.nii.gz


def displacement_file_stem(
    fixed_id: str, moving_id: str, fixed_modality: str | None = None, moving_modality: str | None = None
) -> str:
    """LUMIR's name of a displacement field, without its suffix (``.nii.gz`` or ``.npz``).

    ``disp_{fixed}_{moving}``; when both modality numbers are given, differ,
    and are not ``0000 -> 0001`` (T1 fixed, T2 moving), the cross-modality
    name ``disp_{fixed}_{fixedMod}_{moving}_{movingMod}``, as LUMIR's evaluator
    expects.
    """
    if (
        fixed_modality is None
        or moving_modality is None
        or fixed_modality == moving_modality
        or ((fixed_modality, moving_modality) == ("0000", "0001"))
    ):
        return f"disp_{fixed_id}_{moving_id}"
    return f"disp_{fixed_id}_{fixed_modality}_{moving_id}_{moving_modality}"


def lumir_case_names(fixed: str, moving: str) -> tuple[str, str] | None:
    """LUMIR's names for a pair of image paths ending in ``_{ID}_{modality}.nii.gz`` (four digits each).

    Returns the case key ``"{fixedID}_{fixedMod}<--{movingID}_{movingMod}"``
    (the evaluator's report) and the field's :func:`displacement_file_stem`;
    None if either path does not end that way.
    """
    found = [_LUMIR_IMAGE.search(n) if isinstance(n, str) else None for n in (fixed, moving)]
    if not all(found):
        return None
    (fix, fix_mod), (mov, mov_mod) = (f.groups() for f in found)
    return f"{fix}_{fix_mod}<--{mov}_{mov_mod}", displacement_file_stem(fix, mov, fix_mod, mov_mod)


# --- the Triton models ------------------------------------------------------------------------------------
ENTRY_MODEL, NETWORK_MODEL = "lumireg", "lumireg_network"
MAX_BATCH_SIZE = 8

# entry model ``lumireg``: (name, Triton type, dims, optional); dims per pair, Triton adds the batch axis
INPUTS = (
    ("fixed", "TYPE_UINT8", (1, *CANVAS), False),  # intensities 0..255
    ("moving", "TYPE_UINT8", (1, *CANVAS), False),
    ("moving_labels", "TYPE_INT32", (1, *CANVAS), True),  # only for warped_labels
)
# (name, Triton type, dims); each is computed only when a request asks for it
OUTPUTS = (
    ("displacement", "TYPE_FP32", (3, *CANVAS)),  # voxels, pull-back from the fixed grid, channel c along axis c
    ("displacement_fp16", "TYPE_FP16", (3, *CANVAS)),
    ("inverse_displacement", "TYPE_FP32", (3, *CANVAS)),  # pulls the fixed image onto the moving grid
    ("warped", "TYPE_FP32", (1, *CANVAS)),  # moving resampled onto the fixed grid, trilinear, 0..255
    ("warped_labels", "TYPE_INT32", (1, *CANVAS)),  # moving_labels resampled, nearest neighbour
    ("qc", "TYPE_STRING", (1,)),  # UTF-8 JSON, see lumireg.service.quality.quality_report
)
OUTPUT_NAMES = tuple(name for name, *_ in OUTPUTS)

# network model ``lumireg_network``: the uint8 pair in (the graph divides by 255), the velocity out. Spatial sizes
# are free (-1), multiples of SIZE_MULTIPLE: the canvas for a full-resolution pass, HALF_CANVAS for the coarse pass
NETWORK_SHAPES = (CANVAS, HALF_CANVAS)  # the spatial sizes the service runs the network at
NETWORK_INPUTS = (("fixed", "TYPE_UINT8", (1, -1, -1, -1)), ("moving", "TYPE_UINT8", (1, -1, -1, -1)))
NETWORK_OUTPUT = ("velocity", "TYPE_FP32", (3, -1, -1, -1))  # half-resolution voxels, antisymmetric in the pair
NETWORK_INPUT_NAMES = tuple(name for name, *_ in NETWORK_INPUTS)
NETWORK_OUTPUT_NAME = NETWORK_OUTPUT[0]

# --- where a server listens (lumireg serve's defaults, the Dockerfile, deploy/'s manifests) ------------------
GRPC_PORT, HTTP_PORT, METRICS_PORT = 8001, 8000, 8002  # gRPC (the client), HTTP (KServe v2, health), Prometheus
HEALTH_LIVE_PATH = "/v2/health/live"  # HTTP 200 while the server process serves (liveness)
HEALTH_READY_PATH = "/v2/health/ready"  # HTTP 200 once every model is loaded and ready (readiness, startup)
METRICS_PATH = "/metrics"  # Prometheus text format on METRICS_PORT; Triton's nv_inference_* and lumireg's own
# gRPC keepalive while a request is in flight: the client pings every KEEPALIVE_MS and drops a connection whose
# ping is not answered within KEEPALIVE_TIMEOUT_MS (a hung or unreachable server: its requests fail UNAVAILABLE and
# are sent again, to another server when there are several); a server accepts a ping every MIN_PING_INTERVAL_MS
# (Triton's default, 5 minutes, would answer the pings of a long request with GOAWAY)
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS, MIN_PING_INTERVAL_MS = 20_000, 10_000, 10_000

# --- request parameters (Triton request ``parameters``; lumireg register's options) -------------------------
MAX_REFINE_STEPS = 200  # a request asking for more refinement steps gets INVALID_ARGUMENT


@dataclass(frozen=True)
class Parameter:
    """One request parameter: its type, default and allowed values (``low..high`` for ints, ``choices`` for str)."""

    kind: type
    default: int | str
    meaning: str
    low: int | None = None
    high: int | None = None
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        """The allowed values as the README and error messages write them: ``1..4`` or ``ncc | mi``."""
        return " | ".join(self.choices) if self.choices else f"{self.low}..{self.high}"

    def check(self, name: str, value) -> int | str:
        """``value`` converted to :attr:`kind`; ``ValueError`` naming ``name`` if of the wrong type or not allowed.

        The message quotes at most the first 40 characters of a refused value.
        """
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        if self.kind is str:
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(f"request parameter {name!r} must be one of {self.allowed()}, got {shown}")
            return value
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = self.kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"request parameter {name!r} must be {self.kind.__name__}, got {shown}") from None
        if not self.low <= value <= self.high:
            raise ValueError(f"request parameter {name!r} must be in {self.allowed()}, got {value}")
        return value


# a request outside the allowed values gets INVALID_ARGUMENT
PARAMETERS: dict[str, Parameter] = {
    # default 1, the fastest; a second pass adds Dice at about 2.9x the CPU time (README, "Benchmarks")
    "passes": Parameter(
        int,
        1,
        "network passes: each registers the fixed image to the moving one warped by the "
        "passes before it, and the transforms compose (1 = the network alone)",
        low=1,
        high=4,
    ),
    # default 1: on held-out validation pairs a coarse pass before the network's full-resolution one added 0.039 Dice
    # (independent generator) and 0.034 (training generator), NDV still 0; it costs a network pass (README)
    "coarse": Parameter(
        int,
        1,
        "a network pass on the pair at half resolution before the full-resolution passes, for the large smooth "
        "part of the motion (1 = on, 0 = off); the passes compose with it",
        low=0,
        high=1,
    ),
    "refine": Parameter(
        int,
        0,
        "instance optimisation steps on the last pass's velocity at half resolution "
        "(symmetric similarity + smoothness, still integrated by scaling and squaring; 0 = the network alone)",
        low=0,
        high=MAX_REFINE_STEPS,
    ),
    "similarity": Parameter(
        str,
        "ncc",
        "refinement's similarity: ncc (local NCC; across contrasts, on the moving image the contrast map has put in "
        "the fixed image's contrast) or mi (mutual information)",
        choices=("ncc", "mi"),
    ),
    # default auto: on the held-out T1/T2 pairs the network alone scored Dice 0.23, below no registration (0.49),
    # and with the map 0.72; every same-contrast held-out pair is told apart from them (README, "Other contrasts")
    "contrast": Parameter(
        str,
        "auto",
        "same, or other for images of different contrasts (T1 and T2): the moving image's intensities are mapped "
        "to the fixed image's contrast by the pair's joint histogram before the network; auto: other where the "
        "two images' brain intensities correlate negatively (below 0.1), else same",
        choices=("auto", "same", "other"),
    ),
    # default none: on pre-aligned (LUMIR) pairs affine lowered Dice by 0.003 and costs a CPU pair seconds; the
    # client asks for affine for every image that did not arrive on LUMIR's canvas (README, "Scans in scanner pose")
    "align": Parameter(
        str,
        "none",
        "affine pre-alignment before the network, on the canvas (centre of mass, then local NCC, or MI with "
        "similarity mi, at 1/8 and 1/4 resolution), composed into every output: none, rigid (rotation and shift) "
        "or affine (also scales and shears)",
        choices=("none", "rigid", "affine"),
    ),
}

DEFAULT_PASSES = PARAMETERS["passes"].default
DEFAULT_COARSE = PARAMETERS["coarse"].default
DEFAULT_CONTRAST = PARAMETERS["contrast"].default


def request_parameters(given: dict) -> dict:
    """Every parameter of :data:`PARAMETERS`: the given ones checked, the rest at their defaults.

    ``given`` maps names to values as they arrive (Triton sends ints as ints,
    a string parameter as a string; a numeric string is accepted for an int).
    ``ValueError`` names an unknown parameter, or a value of the wrong type or not allowed.
    """
    unknown = sorted(set(given) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown request parameter(s) {unknown}; lumireg takes {sorted(PARAMETERS)}")
    return {name: parameter.check(name, given.get(name, parameter.default)) for name, parameter in PARAMETERS.items()}


# --- quality-control warnings: qc["warnings"] holds {"code", "message"} for each that applies -------------
NDV_WARNING_PERCENT = 0.01  # non-diffeomorphic volume above this (% of the moving brain) is flagged as folding
# a fall of the mutual information over the fixed brain by more than this (% of its value before) is flagged
MI_DROP_PERCENT = 5
# a moving image with more nonzero canvas volume than this (voxels above 5 % of full intensity) is flagged as not
# skull-stripped: brains with their CSF are 1.1..2.0 l (the synthetic pairs 1.9), heads with scalp and skull 3..5 l
BRAIN_VOLUME_LIMIT_ML = 2500
QC_WARNINGS = {
    "similarity_decreased": "the warped moving image matches the fixed image worse than before registration: "
    f"their mutual information over the brain fell by more than {MI_DROP_PERCENT} %",
    "folding": f"the field folds: non-diffeomorphic volume above {NDV_WARNING_PERCENT} % of the brain",
    "refinement_not_converged": "refinement did not converge: its similarity ended no better than the network's, "
    "so the network's field was kept",
    "alignment_not_converged": "the affine pre-alignment did not converge: the centre-of-mass alignment was used",
    "empty_image": "the fixed or the moving image is empty or of one constant value: there is nothing to register, "
    "the field is about the identity",
    "not_brain_extracted": f"the moving image seems not brain-extracted: over {BRAIN_VOLUME_LIMIT_ML} ml of it is "
    "nonzero on the canvas (inputs must be skull-stripped, as LUMIR's)",
}


# --- access and transport security (lumireg serve --access-key-file / --tls-*, the client's options) --------
# Triton's restricted protocols: each call of a listed group must carry a header with the expected value.
# gRPC takes the header as GRPC_RESTRICTED_PREFIX + name; HTTP as the name itself. Health stays open for probes.
ACCESS_KEY_HEADER = "lumireg-access-key"
ACCESS_KEY_ENV = "LUMIREG_ACCESS_KEY"  # where the client looks for the key when no --access-key-file is given
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"
RESTRICTED_PROTOCOLS = (
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
# Beyond loopback, the shared-memory API answers only callers that can read this host's local secret file
SHARED_MEMORY_HEADER = "lumireg-shm-key"
ACCESS_KEY_MIN_CHARS, ACCESS_KEY_MAX_CHARS = 16, 512
_ACCESS_KEY = re.compile(r"[A-Za-z0-9._~+/-]+")  # printable, no separators Triton's flag or HTTP headers parse


def check_access_key(text: str, source: str) -> str:
    """The access key in ``text`` (surrounding whitespace dropped); ``ValueError`` naming ``source``, never the key,
    unless it is 16..512 characters of ``A-Z a-z 0-9 . _ ~ + / -`` (``openssl rand -hex 32`` makes one)."""
    key = text.strip()
    if not ACCESS_KEY_MIN_CHARS <= len(key) <= ACCESS_KEY_MAX_CHARS or not _ACCESS_KEY.fullmatch(key):
        raise ValueError(
            f"{source}: an access key must be {ACCESS_KEY_MIN_CHARS}..{ACCESS_KEY_MAX_CHARS} characters of "
            f"A-Z a-z 0-9 . _ ~ + / - (make one with `openssl rand -hex 32`)"
        )
    return key


def shared_memory_secret_path(grpc_port: int) -> str:
    """The local file (mode 0600) holding the shared-memory secret of a server listening beyond loopback on
    ``grpc_port``: in ``/dev/shm``, so exactly the callers that could map the server's regions can read it."""
    return f"/dev/shm/lumireg-{int(grpc_port)}.shm-key"


# --- the model repository's files -------------------------------------------------------------------------
ONNX_FILE = "model.onnx"  # the network graph (python and onnxruntime_onnx variants)
PLAN_FILE = "model.plan"  # the TensorRT plan (tensorrt_plan variant)
CHECKPOINT_FILE = "model.pt"  # the exported weights, for the PyTorch path on GPUs
EXPORT_RECORD = "export.json"  # what was exported: weights, sha256, parity, versions
PARITY_PAIR_FILE = "parity_pair.npz"  # lumireg.export's package data: the realistic pair of the parity check

# --- exit codes: one table for every ``lumireg`` command ---------------------------------------------------
EXIT_OK = 0
EXIT_FAILURE = 1  # the work ran and failed (a benchmark with failed requests, a server that died)
EXIT_USAGE = 2  # bad arguments or bad input files: the message says which
EXIT_UNAVAILABLE = 3  # the server cannot be reached or is not ready
EXIT_MISSING_DEPENDENCY = 4  # an optional component is absent (TensorRT, a GPU, antspyx)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT (SIGTERM stops the server cleanly with EXIT_OK)
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "the work ran and failed",
    EXIT_USAGE: "bad arguments or input",
    EXIT_UNAVAILABLE: "server unreachable or not ready",
    EXIT_MISSING_DEPENDENCY: "optional component missing (TensorRT, GPU, antspyx)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
