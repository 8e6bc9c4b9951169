#!/bin/sh
# The image's command: tritonserver on the image's model repository, with a CUDA memory pool on every GPU.
#
# --cuda-memory-pool-byte-size=<gpu>:<bytes> sizes one GPU's pool, so one flag goes in per GPU that CUDA sees here
# (CUDA_VISIBLE_DEVICES, else nvidia-smi's list). The pool holds the GPU tensors the python backend passes by DLPack;
# Triton's default, 64 MB, is less than one float32 field (82.6 MB). LUMIREG_CUDA_POOL_BYTES: bytes per GPU (2 GB).
# LUMIREG_MODELS: another model repository (the TensorRT recipe in the Dockerfile's header). Arguments are added.
# --model-control-mode=none: models load at start and never over the API (no remote load, unload or swap).
# --grpc-http2-min-recv-ping-interval-without-data: lumireg's clients ping every 20 s while a request runs.
set -eu
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .) || true
else
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || true
fi
set -- --model-repository="${LUMIREG_MODELS:-/opt/lumireg/models}" --model-control-mode=none \
    --allow-gpu-metrics=true --grpc-http2-min-recv-ping-interval-without-data=10000 "$@"
gpu=0
while [ "$gpu" -lt "${gpus:-0}" ]; do
    set -- "$@" --cuda-memory-pool-byte-size="$gpu:${LUMIREG_CUDA_POOL_BYTES:-2147483648}"
    gpu=$((gpu + 1))
done
exec tritonserver "$@"
