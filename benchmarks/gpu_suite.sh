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
#   6. lumireg bench service (the sweep, B=1..8, C=1..8) and lumireg bench load (60 s at 20 requests/s).
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
    if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/results" 2>/dev/null || true; fi
else
    echo "skipped: the serving stack does not import here (carry its wheels in ./wheels)" | tee -a "$LOGS/serving.log"
    status=1
fi

step "done: $([ $status = 0 ] && echo all steps passed || echo SOME STEP FAILED), logs in $LOGS"
exit $status
