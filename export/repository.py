"""The Triton model repository: its layout and every ``config.pbtxt``, written from one place.

Two models (``model_repository/`` in the source tree is the embedded variant):

- ``lumireg``, the entry point (python backend): takes the request, asks
  ``lumireg_network`` for the velocity (BLS), integrates, warps and writes the
  QC report (:mod:`lumireg.service.registration_model`). Dynamic batching,
  ``max_batch_size`` 8.
- ``lumireg_network``: the ONNX graph of :mod:`lumireg.export.onnx`, ``uint8``
  pair in, half-resolution velocity out. Its backend is the variant:

  ========== =================================================== =====================
  variant    backend of ``lumireg_network``                      where
  ========== =================================================== =====================
  python     python backend running ONNX Runtime (CPU, or CUDA   the embedded server
             with onnxruntime-gpu)                               (nvidia-pytriton)
  onnx       Triton's ``onnxruntime_onnx`` backend               tritonserver images
  tensorrt   Triton's ``tensorrt_plan`` backend (``model.plan``) tritonserver images
  ========== =================================================== =====================

No ``instance_group`` is written: Triton then puts one instance of each model
on every GPU it sees, or on the CPU when it sees none, so one repository
serves both kinds of host.
"""

from __future__ import annotations

from pathlib import Path

from lumireg.contract import (
    ENTRY_MODEL,
    INPUTS,
    MAX_BATCH_SIZE,
    NETWORK_INPUTS,
    NETWORK_MODEL,
    NETWORK_OUTPUT,
    ONNX_FILE,
    OUTPUTS,
    PLAN_FILE,
)

VARIANTS = ("python", "onnx", "tensorrt")
NETWORK_FILES = {"python": ONNX_FILE, "onnx": ONNX_FILE, "tensorrt": PLAN_FILE}
SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"

_HEADER = "# Written by lumireg.export.repository (`lumireg export`); edit that module, not this file.\n"


def _tensor(name: str, dtype: str, dims, optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{extra} }}'


def _block(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


# The lumireg model's queue policy (bounded overload). A request that finds MAX_QUEUE_SIZE requests waiting, or
# that waits longer than QUEUE_TIMEOUT_US, is refused with UNAVAILABLE (which the client retries with backoff)
# instead of queueing without limit, each waiting request holding its inputs in memory. See README, "Deploying in a
# hospital" for the measurement behind the numbers.
MAX_QUEUE_SIZE = 8
QUEUE_TIMEOUT_US = 60_000_000


def dynamic_batching(max_queue_size: int | None = MAX_QUEUE_SIZE, timeout_us: int = QUEUE_TIMEOUT_US) -> str:
    """The ``dynamic_batching`` block: the queue policy above (``max_queue_size=None``: unbounded, no policy)."""
    if max_queue_size is None:
        return "dynamic_batching { }\n"
    return (
        "dynamic_batching {\n  default_queue_policy {\n    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {timeout_us}\n    max_queue_size: {max_queue_size}\n  }}\n}}\n"
    )


def entry_config(max_queue_size: int | None = MAX_QUEUE_SIZE, timeout_us: int = QUEUE_TIMEOUT_US) -> str:
    """``config.pbtxt`` of the ``lumireg`` model (the queue policy's arguments: :func:`dynamic_batching`)."""
    return (
        _HEADER
        + f'name: "{ENTRY_MODEL}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
        + dynamic_batching(max_queue_size, timeout_us)
        + _block("input", [_tensor(*spec) for spec in INPUTS])
        + _block("output", [_tensor(*output) for output in OUTPUTS])
        # inputs stay where they arrived (GPU memory with CUDA shared memory), no copy to the host
        + _parameters({"network_model": NETWORK_MODEL, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"})
    )


def network_config(variant: str) -> str:
    """``config.pbtxt`` of the ``lumireg_network`` model for a repository variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown repository variant {variant!r}; expected one of {VARIANTS}")
    backend = {
        "python": 'backend: "python"',
        "onnx": 'platform: "onnxruntime_onnx"',
        "tensorrt": 'platform: "tensorrt_plan"',
    }[variant]
    text = (
        _HEADER
        + f'name: "{NETWORK_MODEL}"\n{backend}\nmax_batch_size: {MAX_BATCH_SIZE}\n'
        + _block("input", [_tensor(*spec) for spec in NETWORK_INPUTS])
        + _block("output", [_tensor(*NETWORK_OUTPUT)])
    )
    if variant == "python":
        text += _parameters({"network_file": NETWORK_FILES[variant], "FORCE_CPU_ONLY_INPUT_TENSORS": "no"})
    return text


def _python_model(module: str) -> str:
    return (
        f'"""Triton python-backend entry; the model lives in {module}."""\n\n'
        f"from {module} import TritonPythonModel  # noqa: F401\n"
    )


def repository_files(variant: str = "python") -> dict[str, str]:
    """Every text file of a repository variant, by path relative to its root (network weights excluded)."""
    files = {
        f"{ENTRY_MODEL}/config.pbtxt": entry_config(),
        f"{ENTRY_MODEL}/1/model.py": _python_model("lumireg.service.registration_model"),
        f"{NETWORK_MODEL}/config.pbtxt": network_config(variant),
    }
    if variant == "python":
        files[f"{NETWORK_MODEL}/1/model.py"] = _python_model("lumireg.service.network_model")
    return files


def network_path(root: str | Path, variant: str = "python") -> Path:
    """Where the network's weights file of a repository variant goes."""
    return Path(root) / NETWORK_MODEL / "1" / NETWORK_FILES[variant]


def write_repository(root: str | Path, variant: str = "python") -> Path:
    """Write the configs and python-model files of ``variant`` under ``root``; returns ``root``.

    Files whose content is already right are left untouched, so writing into
    the source tree's ``model_repository/`` changes nothing that git tracks.
    """
    root = Path(root)
    for relative, text in repository_files(variant).items():
        path = root / relative
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if variant != "python":
        stale = root / NETWORK_MODEL / "1" / "model.py"
        stale.unlink(missing_ok=True)  # a python model file would make Triton's onnx/trt backends complain
    return root
