#!/usr/bin/env bash
# Every GPU check of lumireg in one call, for a lent GPU machine or any CUDA host.
#
# Usage, from the repository root (no venv needed; it uses $PYTHON, default python3):
#     bash benchmarks/gpu_suite.sh
# Through the device tool: run(command="bash benchmarks/gpu_suite.sh", timeout_s=600).
#
# Steps, each logged; a failed step does not stop the later ones:
#   1. install lumireg editable with '.[server,test]'; if the pins cannot be met
#      (no network, another Python, torch/triton preinstalled), install lumireg
#      alone over what is there and pip-install only what is missing;
#   2. record the environment (nvidia-smi, versions, commit); stop if torch sees no GPU;
#   3. python -m pytest tests/kernels -q  (tests/conftest.py puts the Triton kernels on CUDA);
#   4. lumireg bench kernels at LUMIR's full size (extra options: BENCH_ARGS="--repeats 20");
#      then lumireg bench refine: one refinement step and requests with refine = 10, 25, 50;
#      then lumireg bench align: the affine pre-alignment's cost and corner error on 8 posed brains;
#   5. the GPU serving path: the embedded server's tests (models on the GPU, post-processing in the
#      Triton kernels on CUDA tensors), the client's tests, and `make serve`'s export;
#   6. lumireg bench service (the sweep, B=1..8, C=1..8) and lumireg bench load (60 s at 20 requests/s);
#   7. on 2+ GPUs: 1, 2 and 4 servers, one per GPU, behind one `lumireg register --url a,b,...` (pairs/s).
# Steps 5-6 need nvidia-pytriton (and onnx, onnxruntime, tritonclient, nibabel, scipy, prometheus-client);
# on a machine without a registry, put their wheels in ./wheels and carry that folder.
# Logs and the benchmark JSON go to $OUT when set (the device tool fetches it),
# else to a fresh folder under /tmp; the JSON also lands in benchmarks/results/<device>/.
# Exit status: 0 if every step passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d /tmp/lumireg-gpu-suite.XXXX)}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
status=0
step() { echo; echo "=== $* ==="; }

# Step 7: N servers (N = 1, 2, 4, at most the GPUs here), server k on GPU k (CUDA_VISIBLE_DEVICES) and ports
# 8001+10k (gRPC), 8000+10k (HTTP), 8002+10k (metrics); one `lumireg register --pairs` of SWEEP_PAIRS
# (default 64) LUMIR pairs with --url listing them all and 4 requests in flight per server; prints pairs/s and
# each server's requests from its metrics, into scaling.log and $OUT/scaling.csv.
scaling_sweep() {
    local gpus=$1 data n k pids urls rate counts
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
    echo "servers,pairs,pairs_per_s,requests_per_server" > "${OUT:-$data}/scaling.csv"
    for n in 1 2 4; do
        [ "$n" -le "$gpus" ] || break
        pids=(); urls=()
        for ((k = 0; k < n; k++)); do
            CUDA_VISIBLE_DEVICES=$k "$PY" -m lumireg serve --grpc-port $((8001 + 10 * k)) \
                --http-port $((8000 + 10 * k)) --metrics-port $((8002 + 10 * k)) > "$data/serve$k.log" 2>&1 &
            pids+=($!); urls+=("127.0.0.1:$((8001 + 10 * k))")
        done
        for ((k = 0; k < n; k++)); do  # ready: every model loaded (180 s at most)
            "$PY" -c 'import sys, time, urllib.request as u
for _ in range(360):
    try: u.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=2); sys.exit(0)
    except OSError: time.sleep(0.5)
sys.exit(1)' $((8000 + 10 * k)) || echo "server $k never became ready (log: $data/serve$k.log)"
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
        echo "$n,${SWEEP_PAIRS:-64},$rate,$counts" >> "${OUT:-$data}/scaling.csv"
        kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null
    done
}

step "1. install" | tee "$LOGS/install.log"
{
    # short network timeouts: the lent machines reach no registry, so fail fast there
    if [ -d wheels ]; then "$PY" -m pip install --no-index --find-links wheels wheels/*.whl || true; fi
    "$PY" -m pip install --timeout 10 --retries 0 -e '.[server,test]' || {
        echo "full install failed; installing lumireg alone over the packages already here"
        "$PY" -m pip install --no-deps --no-build-isolation --ignore-requires-python -e . || true
        missing=$("$PY" -c 'import importlib.util as u; print(*[m for m in ("torch", "triton", "tqdm", "pytest") if not u.find_spec(m)])')
        if [ -n "$missing" ]; then "$PY" -m pip install --timeout 10 --retries 0 $missing; fi
    }
} 2>&1 | tee -a "$LOGS/install.log"
if ! "$PY" -c 'import lumireg.kernels' 2>/dev/null; then
    # last resort: lumireg is this folder (package-dir "lumireg" = "."), so put a link to it on the path
    shim=$(mktemp -d); ln -s "$PWD" "$shim/lumireg"; export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install unusable; importing lumireg through $shim" | tee -a "$LOGS/install.log"
fi
"$PY" -c 'import lumireg.kernels' 2>&1 | tee -a "$LOGS/install.log" || { echo "lumireg does not import"; status=1; }

step "2. environment" | tee "$LOGS/env.txt"
{
    nvidia-smi || true
    echo "commit $(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown: no git checkout here)"
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'
} 2>&1 | tee -a "$LOGS/env.txt"
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "torch sees no CUDA device: nothing here is a GPU check; stopping" | tee -a "$LOGS/env.txt"
    exit 1
fi

step "3. kernel tests on CUDA" | tee "$LOGS/pytest.log"
"$PY" -m pytest tests/kernels -q 2>&1 | tee -a "$LOGS/pytest.log" || status=1

step "4. kernel benchmark, full size" | tee "$LOGS/bench.log"
# shellcheck disable=SC2086  # BENCH_ARGS is split on purpose
"$PY" -m lumireg bench kernels --out benchmarks/results ${BENCH_ARGS:-} 2>&1 | tee -a "$LOGS/bench.log" || status=1
json=$(sed -n 's/^wrote //p' "$LOGS/bench.log" | tail -n 1)
if [ -n "${OUT:-}" ] && [ -f "$json" ]; then
    cp "$json" "$OUT/kernels-$(basename "$(dirname "$json")").json"
fi

step "4b. refinement: one step (NCC, MI) and requests with refine = 10, 25, 50 (goal: 50 steps < 100 ms)" \
    | tee "$LOGS/refine.log"
"$PY" -m lumireg bench refine --device cuda --steps 10,25,50 --repeats 5 --out benchmarks/results 2>&1 \
    | tee -a "$LOGS/refine.log" || status=1
json=$(sed -n 's/^wrote //p' "$LOGS/refine.log" | tail -n 1)
if [ -n "${OUT:-}" ] && [ -f "$json" ]; then
    cp "$json" "$OUT/refine-$(basename "$(dirname "$json")").json"
fi

step "4c. affine pre-alignment (align=rigid|affine, NCC and MI) on posed brains (goal: a few ms a pair)" \
    | tee "$LOGS/align.log"
"$PY" -m lumireg bench align --device cuda --poses 8 --out benchmarks/results 2>&1 \
    | tee -a "$LOGS/align.log" || status=1
json=$(sed -n 's/^wrote //p' "$LOGS/align.log" | tail -n 1)
if [ -n "${OUT:-}" ] && [ -f "$json" ]; then
    cp "$json" "$OUT/align-$(basename "$(dirname "$json")").json"
fi

step "5. GPU serving path: embedded server and client tests" | tee "$LOGS/serving.log"
if "$PY" -c 'import pytriton, onnxruntime, tritonclient.grpc, nibabel, prometheus_client' 2>>"$LOGS/serving.log"; then
    "$PY" -m lumireg export 2>&1 | tee -a "$LOGS/serving.log" || status=1
    "$PY" -m pytest tests/service tests/client tests/export tests/benchmarks -q 2>&1 | tee -a "$LOGS/serving.log" || status=1

    step "6. service benchmark and load test" | tee "$LOGS/service-bench.log"
    "$PY" -m lumireg bench service --out benchmarks/results 2>&1 | tee -a "$LOGS/service-bench.log" || status=1
    "$PY" -m lumireg bench load --rate 20 --duration 60 --out benchmarks/results 2>&1 \
        | tee -a "$LOGS/service-bench.log" || status=1

    step "7. servers across GPUs: 1, 2, 4 lumireg serve (one GPU each) behind one lumireg register" \
        | tee "$LOGS/scaling.log"
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    if [ "$gpus" -ge 2 ]; then scaling_sweep "$gpus" 2>&1 | tee -a "$LOGS/scaling.log" || status=1
    else echo "skipped: $gpus GPU(s) here; the sweep needs 2 or more" | tee -a "$LOGS/scaling.log"; fi
    if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/results" 2>/dev/null || true; fi
else
    echo "skipped: the serving stack does not import here (carry its wheels in ./wheels)" | tee -a "$LOGS/serving.log"
    status=1
fi

step "done: $([ $status = 0 ] && echo all steps passed || echo SOME STEP FAILED), logs in $LOGS"
exit $status
