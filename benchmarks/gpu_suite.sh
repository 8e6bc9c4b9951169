#!/usr/bin/env bash
# lumireg's GPU checks, step by step, sized for a lent GPU machine (15 minutes of device time, 10 a command).
#
# Usage, from anywhere ($PYTHON, default python3: the machine's own, with its torch and triton):
#     bash benchmarks/gpu_suite.sh [--rehearse] [STEP ...]          (no STEP: all)
# Through the device tool, the most valuable steps first, in one call:
#     run(command="bash benchmarks/gpu_suite.sh kernels pipeline serve", timeout_s=600)
#
# Steps, run in this order (by value) whatever order they are named in; each command under its own `timeout`:
#   preflight   seconds: a GPU torch sees, a C compiler and Python.h (Triton's JIT builds its launcher with them),
#               triton's version against the API the kernels use (tl.dot's input_precision, tl.static_range),
#               the Python modules the chosen steps import, and for the server steps glibc >= 2.35 (the
#               tritonserver of nvidia-pytriton 0.7.0 is manylinux_2_35) and a python-backend stub for this
#               Python. Runs before any other step; exit 3, naming each thing missing, if one is.
#   kernels     the kernel tests against their PyTorch twins on CUDA (tests/kernels), then `lumireg bench kernels`
#               at 160 x 224 x 192, B = 1 and 4 (kernels.json)
#   pipeline    the served computation in process (network + post-processing), B = 1, 2, 4, 8 (pipeline.json)
#   serve       the embedded server (nvidia-pytriton) on the GPU: `lumireg bench service`, batch 1..8 and
#               concurrency 1..8 (service.json, .csv, .png); SERVICE_ARGS overrides "--requests 20 --warmup 3"
#   sweep       `lumireg bench kernels --sweep-blocks` at B = 1: every op over BLOCK x warps, each size checked
#               against the reference, the fastest correct one per op (kernels-sweep.json); needs a GPU (a
#               rehearsal skips it)
#   refine      `lumireg bench refine`: one refinement step and requests with refine = 10, 25, 50 (refine.json)
#   align       `lumireg bench align`: the affine pre-alignment on 8 posed brains (align.json)
#   servetests  the embedded server's tests, the client's, the export's and the benchmarks' (served vs in
#               process within 1e-3 voxels)
#   load        `lumireg bench load`: 60 s at 20 requests/s (load.json)
#   scaling     on 2+ GPUs: 1, 2 and 4 servers, one per GPU, behind one `lumireg register --url a,b,...`
# Time limits (s): TIMEOUT_<STEP>=N overrides a step's (each of its commands gets it), e.g. TIMEOUT_KERNELS=300.
#
# Results: benchmarks/results/<device>/ (RESULTS=DIR for another root): each benchmark's JSON as it ends, and
# gpu-suite/: each command's log, env.txt and steps.csv (step, exit status, seconds) as the suite goes. With
# $OUT set (the device tool) the whole log streams to $OUT/gpu-suite.log and $OUT/results.tgz (that device
# folder) is rewritten after every command, so a run cut short still brings back what it measured.
#
# Installs: nothing from a registry and never torch or triton. Wheels in ./wheels (carried; the lent machines
# reach no registry) are installed with `pip install --no-index --find-links wheels --no-deps`, torch's and
# triton's excepted; lumireg itself is imported from this folder (no install). The lent machines lack, for
# pipeline/refine/align: nibabel, nilearn, surface-distance; for the server steps also nvidia-pytriton,
# tritonclient[grpc] (+ python-rapidjson); the pre-flight names what is missing.
#
# --rehearse (a host without a GPU): the same commands at tiny sizes, Triton kernels under TRITON_INTERPRET=1,
# results in a temporary folder (the committed CPU results stay as they are); the missing GPU is reported, not
# fatal. Rehearsed on the project's 2-core EPYC (shared with other jobs, load 3 to 7), seconds per step:
#   preflight 3 (reports the missing GPU), kernels 162 (171 kernel tests under the interpreter 157, the benchmark
#   at 16 x 24 x 16 5), pipeline 68 (B = 1, 2 at full size), serve 103 (server start and one request per run),
#   refine 28, align 31, servetests 106 (2 tests), load 79 (4 s at 0.5 requests/s), scaling 0 (skipped: one
#   GPU or none); about 10 minutes in all. A lent GPU: `kernels pipeline serve` first, in one call.
# Exit status: 0 every step passed, 1 a step failed or timed out (124), 2 an unknown step, 3 pre-flight failed.
# shellcheck disable=SC2054,SC2329  # commas belong to the options' values; the functions run through run()
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

ORDER=(kernels pipeline serve sweep refine align servetests load scaling)
declare -A LIMIT=([preflight]=60 [kernels]=240 [pipeline]=150 [serve]=360 [sweep]=240 [refine]=180 [align]=180
    [servetests]=420 [load]=150 [scaling]=480)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

rehearse=0 chosen=()
for arg in "$@"; do
    case $arg in
        --rehearse | --dry-run) rehearse=1 ;;
        all) chosen+=("${ORDER[@]}") ;;
        preflight) chosen+=(preflight) ;;
        *)
            if [[ " ${ORDER[*]} " != *" $arg "* ]]; then
                echo "gpu_suite.sh: unknown step '$arg'; steps: preflight ${ORDER[*]} all (and --rehearse)" >&2
                exit 2
            fi
            chosen+=("$arg") ;;
    esac
done
[ ${#chosen[@]} -gt 0 ] || chosen=("${ORDER[@]}")
wants() { [[ " ${chosen[*]} " == *" $1 "* ]]; }
if [ $rehearse = 1 ]; then
    export TRITON_INTERPRET=1
    RESULTS=${RESULTS:-$(mktemp -d /tmp/lumireg-gpu-suite.XXXX)}
fi
RESULTS=${RESULTS:-benchmarks/results}

# lumireg is this folder (package-dir "lumireg" = "."): import it through a link, whatever is installed
shim=$(mktemp -d) && ln -s "$PWD" "$shim/lumireg" && export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
if [ -d wheels ]; then
    torch_before=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
    carried=()
    for wheel in wheels/*.whl; do
        case ${wheel#wheels/} in torch-* | triton-* | "*.whl") ;; *) carried+=("$wheel") ;; esac
    done
    [ ${#carried[@]} = 0 ] || "$PY" -m pip install -q --no-index --find-links wheels --no-deps "${carried[@]}"
    [ "$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" = "$torch_before" ] \
        || echo "WARNING: torch changed from $torch_before while installing ./wheels"
fi

DEVICE=$("$PY" -c 'from lumireg.benchmarks.machine import device_name, slug; print(slug(device_name()))' 2>/dev/null)
DIR="$RESULTS/${DEVICE:-unknown-device}/gpu-suite"
mkdir -p "$DIR"
LOG=${OUT:-$DIR}/gpu-suite.log
status=0
echo "gpu_suite.sh ${chosen[*]}$([ $rehearse = 1 ] && echo ' (rehearsal)'): results in $DIR/.." | tee -a "$LOG"

save() {  # the device folder into $OUT, whole, after every command
    [ -n "${OUT:-}" ] || return 0
    tar -czf "$OUT/results.tgz.part" -C "$RESULTS" "${DEVICE:-unknown-device}" && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}

run() {  # run NAME STEP CMD...: CMD under STEP's time limit; its log in $DIR/NAME.log; a row in steps.csv
    local name=$1 limit=${LIMIT[$2]} start=$SECONDS rc var="TIMEOUT_${2^^}"
    limit=${!var:-$limit}
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$DIR/$name.log" | tee -a "$LOG"  # the functions too
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "$name: TIMED OUT after $limit s" | tee -a "$LOG"
    echo "=== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$LOG"
    echo "$name,$rc,$((SECONDS - start))" >>"$DIR/steps.csv"
    [ "$rc" = 0 ] || status=1
    save
    return "$rc"
}

preflight() {  # prints each requirement of the chosen steps; exit 1 if one is missing
    "$PY" - "$rehearse" "$@" <<'PYEOF'
import importlib.util, os, platform, shutil, subprocess, sys, sysconfig
rehearse, steps = sys.argv[1] == "1", set(sys.argv[2:])
missing = []
def need(ok, what, fix=""):
    print(f"{'ok     ' if ok else 'MISSING'} {what}{'' if ok else '; ' + fix if fix else ''}")
    ok or missing.append(what)
try:
    import torch
    gpu = torch.cuda.is_available()
    need(gpu, f"a GPU visible to torch {torch.__version__} (CUDA build {torch.version.cuda}): "
         + (torch.cuda.get_device_name() if gpu else "no GPU: torch.cuda.is_available() is False"),
         "this suite measures the GPU; on a host without one, rehearse it with --rehearse")
except ImportError:
    need(False, "torch", "use the machine's own torch (this suite never installs it)")
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
need(cc, f"a C compiler for Triton's JIT: {cc or 'no $CC, gcc or clang'}", "apt-get install gcc, or set CC")
scheme = sysconfig.get_default_scheme()
include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
need(os.path.isfile(f"{include}/Python.h"), f"Python headers for Triton's JIT: {include}/Python.h",
     f"apt-get install python{sys.version_info.major}.{sys.version_info.minor}-dev")
try:
    import inspect, triton, triton.language as tl
    api = "input_precision" in inspect.signature(tl.dot).parameters and hasattr(tl, "static_range")
    need(api, f"triton {triton.__version__} with the API the kernels use (tl.dot(input_precision=), "
         "tl.static_range)", "triton >= 3.0 (pyproject pins 3.7.1)")
except ImportError:
    need(False, "triton", "use the triton that came with the machine's torch")
server = steps & {"serve", "servetests", "load", "scaling"}
modules = {"pytest": "pytest", "tqdm": "tqdm"}
if steps - {"kernels"}:
    modules |= {m: m for m in ("nibabel", "nilearn", "scipy", "onnx", "onnxruntime")}
    modules["surface_distance"] = "surface-distance"
if server:
    modules |= {"pytriton": "nvidia-pytriton", "tritonclient.grpc": "tritonclient[grpc]",
                "prometheus_client": "prometheus-client", "matplotlib": "matplotlib"}
    libc = platform.libc_ver()[1] or "unknown"
    need(libc != "unknown" and tuple(map(int, libc.split("."))) >= (2, 35),
         f"glibc >= 2.35 for nvidia-pytriton's tritonserver: glibc {libc}", "run the server steps on a newer OS")
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
absent = sorted(pip for name, pip in modules.items() if not found(name))
need(not absent, f"Python modules of steps {' '.join(sorted(steps))}: " + (", ".join(absent) or "all there"),
     "carry their wheels in ./wheels (--no-deps: name each dependency too)")
if server and found("pytriton"):
    stubs = os.path.join(os.path.dirname(importlib.util.find_spec("pytriton").origin), "tritonserver",
                         "python_backend_stubs", f"{sys.version_info.major}.{sys.version_info.minor}")
    need(os.path.isdir(stubs), f"a python-backend stub for Python {platform.python_version()}: {stubs}",
         "another Python or nvidia-pytriton")
    import numpy
    if numpy.__version__ >= "2":
        print(f"note    numpy {numpy.__version__}: nvidia-pytriton 0.7.0's server was seen working with numpy<2")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
if missing:
    gpu_only = [m for m in missing if m.startswith("a GPU")]
    print(f"pre-flight: {len(missing)} missing: " + " | ".join(missing))
    sys.exit(0 if rehearse and missing == gpu_only else 1)
PYEOF
}

# sizes: a GPU's, or tiny ones for a rehearsal on a CPU
if [ $rehearse = 1 ]; then
    dev=cpu batches=1,2 repeats=1 shape=32,48,32
    kbench=(--device cpu --shape 16,24,16 --batch-sizes 1 --warmup 0 --repeats 1)
    ktests=(tests/kernels -q -k "not compile")
    refine=(--steps 2 --similarities ncc --shape "$shape")
    align=(--poses 1 --modes rigid --similarities ncc --shape "$shape")
    service=(--batch-sizes 1 --concurrency 1 --requests 1 --warmup 0)
    servetests=(tests/service/test_server.py -q -k "health or equals_in_process")
    load=(--rate 0.5 --duration 4)
else
    dev=cuda batches=1,2,4,8 repeats=10
    kbench=(--device cuda)
    ktests=(tests/kernels -q)
    refine=(--steps 10,25,50 --repeats 5)
    align=(--poses 8)
    read -r -a service <<<"${SERVICE_ARGS:---requests 20 --warmup 3}"
    servetests=(tests/service tests/client tests/export tests/benchmarks -q)
    load=(--rate 20 --duration 60)
fi

# Step scaling: N servers (N = 1, 2, 4, at most the GPUs here), server k on GPU k (CUDA_VISIBLE_DEVICES) and ports
# 8001+10k (gRPC), 8000+10k (HTTP), 8002+10k (metrics); one `lumireg register --pairs` of SWEEP_PAIRS
# (default 64) LUMIR pairs with --url listing them all and 4 requests in flight per server; prints pairs/s and
# each server's requests from its metrics, into scaling.csv.
scaling_sweep() {
    local gpus n k pids urls rate counts data
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    if [ "$gpus" -lt 2 ]; then echo "skipped: $gpus GPU(s) here; the sweep needs 2 or more"; return 0; fi
    data=$(mktemp -d /tmp/lumireg-sweep.XXXX)
    "$PY" - "$data" "${SWEEP_PAIRS:-64}" <<'PYEOF' || return 1
import os, sys, nibabel as nib
from lumireg.contract import intensities_to_uint8
from lumireg.train.canvas import lumir_canvas
from lumireg.train.synthetic import evaluation_seeds, synthetic_pair
root, count = sys.argv[1], int(sys.argv[2])
pair = synthetic_pair(evaluation_seeds(1)[0], labels=False)
for name, key in (("LUMIRMRI_3455_0000.nii.gz", "fixed"), ("LUMIRMRI_3456_0000.nii.gz", "moving")):
    nib.save(nib.Nifti1Image(intensities_to_uint8(pair[key].numpy())[0], lumir_canvas().affine), f"{root}/{name}")
rows = []
for k in range(count):  # distinct names, so each pair writes its own folder
    os.symlink(f"{root}/LUMIRMRI_3456_0000.nii.gz", f"{root}/LUMIRMRI_{4000 + k}_0000.nii.gz")
    rows.append(f"LUMIRMRI_3455_0000.nii.gz,LUMIRMRI_{4000 + k}_0000.nii.gz")
open(f"{root}/pairs.csv", "w").write("\n".join(rows) + "\n")
PYEOF
    echo "servers,pairs,pairs_per_s,requests_per_server" >"$DIR/scaling.csv"
    for n in 1 2 4; do
        [ "$n" -le "$gpus" ] || break
        pids=() urls=()
        for ((k = 0; k < n; k++)); do
            CUDA_VISIBLE_DEVICES=$k "$PY" -m lumireg serve --grpc-port $((8001 + 10 * k)) \
                --http-port $((8000 + 10 * k)) --metrics-port $((8002 + 10 * k)) >"$DIR/serve$k.log" 2>&1 &
            pids+=($!) urls+=("127.0.0.1:$((8001 + 10 * k))")
        done
        for ((k = 0; k < n; k++)); do # ready: every model loaded (180 s at most)
            "$PY" -c 'import sys, time, urllib.request as u
for _ in range(360):
    try: u.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=2); sys.exit(0)
    except OSError: time.sleep(0.5)
sys.exit(1)' $((8000 + 10 * k)) || echo "server $k never became ready (log: $DIR/serve$k.log)"
        done
        "$PY" -m lumireg register --pairs "$data/pairs.csv" -o "$data/out$n" --outputs displacement \
            --url "$(IFS=,; echo "${urls[*]}")" --transport grpc --concurrency $((4 * n)) | tee "$data/register$n.log"
        rate=$(sed -n 's/.*(\([0-9.]*\) pairs\/s).*/\1/p' "$data/register$n.log")
        counts=$(for ((k = 0; k < n; k++)); do "$PY" -c 'import sys, urllib.request as u
from prometheus_client.parser import text_string_to_metric_families as parse
text = u.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
print(int(sum(s.value for f in parse(text) for s in f.samples
              if s.name == "nv_inference_request_success_total" and s.labels.get("model") == "lumireg")))' \
            $((8002 + 10 * k)); done | paste -sd/)
        echo "$n server(s): $rate pairs/s; requests per server $counts"
        echo "$n,${SWEEP_PAIRS:-64},$rate,$counts" >>"$DIR/scaling.csv"
        kill "${pids[@]}"
        wait "${pids[@]}" 2>/dev/null
    done
}

# the served computation in process at each batch size, into pipeline.json as each ends
pipeline() {
    "$PY" - "$RESULTS" "$dev" "$batches" "$repeats" <<'PYEOF'
import json, sys
from pathlib import Path
from lumireg.benchmarks.machine import device_name, header, slug
from lumireg.benchmarks.serving import sample_batch
from lumireg.benchmarks.service import measure_in_process
from lumireg.export.repository import SOURCE_REPOSITORY
from lumireg.service.runner import ensure_exported
out, device, batches, repeats = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split(",")], int(sys.argv[4])
ensure_exported(SOURCE_REPOSITORY)
images, report = sample_batch(max(batches)), {**header("pipeline"), "rows": []}
path = Path(out) / slug(device_name(device == "cuda")) / "pipeline.json"
for batch in batches:  # one warm-up per batch size: Triton compiles for each shape, cuDNN picks its algorithms
    row = measure_in_process(device, repeats, 1, images, batch)
    print(f"B={batch}: p50 {row['p50_ms']:.1f} ms, {row['pairs_per_s']:.2f} pairs/s")
    report["rows"].append(row)
    path.write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {path}")
PYEOF
}

export -f preflight pipeline scaling_sweep
export PY DIR RESULTS dev batches repeats rehearse
{
    echo "commit $(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)"
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__)'
    nvidia-smi 2>/dev/null
} >"$DIR/env.txt" 2>&1
targets=("${chosen[@]}")
[ "${chosen[*]}" = preflight ] && targets=("${ORDER[@]}")
if ! run preflight preflight preflight "${targets[@]}"; then
    echo "pre-flight failed: $(tail -n 1 "$DIR/preflight.log")" >&2
    exit 3
fi

# shellcheck disable=SC2086  # BENCH_ARGS is split on purpose
for step in "${ORDER[@]}"; do
    wants "$step" || continue
    case $step in
        kernels)
            run kernel-tests kernels "$PY" -m pytest "${ktests[@]}"
            run kernel-bench kernels "$PY" -m lumireg bench kernels "${kbench[@]}" --out "$RESULTS" ${BENCH_ARGS:-} ;;
        pipeline) run pipeline pipeline pipeline ;;
        serve) run service-bench serve "$PY" -m lumireg bench service "${service[@]}" --out "$RESULTS" ;;
        sweep)
            if [ $rehearse = 1 ]; then
                echo "sweep: skipped in a rehearsal (it times Triton launch sizes: a GPU only)" | tee -a "$LOG"
            else
                run kernel-sweep sweep "$PY" -m lumireg bench kernels --device cuda --batch-sizes 1 --sweep-blocks \
                    --out "$RESULTS"
            fi ;;
        refine) run refine refine "$PY" -m lumireg bench refine --device $dev "${refine[@]}" --out "$RESULTS" ;;
        align) run align align "$PY" -m lumireg bench align --device $dev "${align[@]}" --out "$RESULTS" ;;
        servetests) run servetests servetests "$PY" -m pytest "${servetests[@]}" ;;
        load) run load load "$PY" -m lumireg bench load "${load[@]}" --out "$RESULTS" ;;
        scaling) run scaling scaling scaling_sweep ;;
    esac
done

echo "=== done: $([ $status = 0 ] && echo every step passed || echo SOME STEP FAILED); $DIR/steps.csv:" | tee -a "$LOG"
tee -a "$LOG" <"$DIR/steps.csv"
exit $status
