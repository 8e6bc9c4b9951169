"""Every Triton kernel compiles for an H100 (sm_90), on a machine without a GPU.

The interpreter that runs the kernels in CI executes them as Python: it does
not catch what only the compiler rejects (types, constexpr misuse). This
compiles each kernel ahead of time with the ptxas that ships in the triton
wheel, for float32 and float64 accumulation and the variants the ops launch,
in a subprocess where the interpreter is off, and reads the atomics in the PTX.
"""

import json
import os
import re
import subprocess
import sys

import pytest

# (module, kernel, its constexpr values besides ACC (and BLOCK, 1024 unless given), pointer types that differ from the
# accumulation type); other arguments are i32, `scale` fp32
CASES = [
    ("warp", "_warp_forward_kernel", {"NEAREST": False, "BORDER": False, "RESIDUAL": False}, {}),
    ("warp", "_warp_forward_kernel", {"NEAREST": False, "BORDER": True, "RESIDUAL": True}, {}),
    (
        "warp",
        "_warp_forward_kernel",
        {"NEAREST": True, "BORDER": False, "RESIDUAL": False},
        {"image_ptr": "*i32", "out_ptr": "*i32"},
    ),
    (
        "warp",
        "_warp_forward_kernel",
        {"NEAREST": False, "BORDER": False, "RESIDUAL": False},
        {"image_ptr": "*fp16", "out_ptr": "*fp16"},
    ),
    ("warp", "_warp_backward_kernel", {"BORDER": False, "IMAGE_GRAD": True, "DISP_GRAD": True}, {}),
    ("warp", "_warp_backward_kernel", {"BORDER": True, "IMAGE_GRAD": False, "DISP_GRAD": True}, {}),
    ("ncc", "_ncc_products_w_kernel", {"WINDOW": 9}, {"fixed_ptr": "*bf16", "moving_ptr": "*bf16"}),
    ("ncc", "_ncc_box_kernel", {"FIELDS": 5, "WINDOW": 9}, {}),
    ("ncc", "_ncc_forward_kernel", {"WINDOW": 9, "COEFFICIENTS": False}, {}),
    ("ncc", "_ncc_forward_kernel", {"WINDOW": 9, "COEFFICIENTS": True}, {}),
    ("ncc", "_ncc_backward_kernel", {"WINDOW": 9}, {}),
    ("mutual_information", "_mi_joint_kernel", {"BINS_P": 32, "BLOCK": 128}, {}),
    ("mutual_information", "_mi_joint_kernel", {"BINS_P": 128, "BLOCK": 32}, {}),
    # no 16-bit pointers: the op casts half inputs to float64 when it accumulates in float64 (Triton's fp64 MMA
    # rejects them), a pairing this table, which compiles every case for both accumulators, cannot express
    (
        "mutual_information",
        "_mi_backward_kernel",
        {"BINS_P": 32, "BLOCK": 128, "FIXED_GRAD": True, "MOVING_GRAD": True},
        {},
    ),
    (
        "mutual_information",
        "_mi_backward_kernel",
        {"BINS_P": 16, "BLOCK": 128, "FIXED_GRAD": False, "MOVING_GRAD": True},
        {},
    ),
    (
        "mutual_information",
        "_mi_backward_kernel",
        {"BINS_P": 128, "BLOCK": 32, "FIXED_GRAD": True, "MOVING_GRAD": False},
        {},
    ),
]
ACCUMULATORS = ("fp32", "fp64")

COMPILE_ALL = """
import importlib, json, sys, traceback
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
results = []
for module, name, constants, pointers, acc in json.load(sys.stdin):
    kernel = getattr(importlib.import_module("lumireg.kernels." + module), name)
    constexprs = {"BLOCK": 1024, **constants, "ACC": getattr(tl, "float" + acc[2:])}
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, "*" + acc) if a.endswith("_ptr")
                 else "fp32" if a == "scale" else "i32" for a in kernel.arg_names}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        results.append([len(compiled.asm["cubin"]), compiled.asm["ptx"]])
    except Exception:
        results.append(traceback.format_exc(limit=3))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled():
    """``[cubin size (bytes), PTX]`` or the compiler's error, per (case index, accumulator)."""
    jobs = [[*case, acc] for case in CASES for acc in ACCUMULATORS]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    return {
        (i, acc): results[i * len(ACCUMULATORS) + k] for i in range(len(CASES)) for k, acc in enumerate(ACCUMULATORS)
    }


@pytest.mark.parametrize("acc", ACCUMULATORS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_compiles_for_sm90(compiled, index, acc):
    result = compiled[(index, acc)]
    assert isinstance(result, list) and result[0] > 1000, f"{CASES[index][:3]} with {acc}:\n{result}"


def test_gradient_scatter_atomics_are_relaxed_not_fences(compiled):
    # acq_rel, Triton's default, orders every add against the program's other memory accesses; a sum needs no order
    atomics = {
        op
        for result in compiled.values()
        if isinstance(result, list)
        for op in re.findall(r"\b(?:atom|red)\.[\w.]+", result[1])
    }
    assert atomics and all(".relaxed." in op for op in atomics), atomics
