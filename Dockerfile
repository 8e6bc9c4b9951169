# lumireg on a production GPU host: NVIDIA Triton Inference Server with the network in Triton's
# onnxruntime backend and lumireg's post-processing (Triton kernels on GPU tensors) in the python backend.
#
#   docker build -t lumireg .
#   docker run --rm --gpus all --shm-size 2g -p 8000:8000 -p 8001:8001 -p 8002:8002 lumireg
#
# A TensorRT plan instead of the ONNX network (built on the serving GPU, at start):
#   docker run --rm --gpus all --shm-size 2g -p 8000-8002:8000-8002 lumireg \
#     sh -c 'lumireg export --trt --fp16 --repository /opt/lumireg/models && exec tritonserver --model-repository=/opt/lumireg/models'
#
# --shm-size: the python backend hands tensors between Triton and its stub processes through /dev/shm
# (a batch of 8 float32 fields is 660 MB). The CUDA memory pool below holds the GPU tensors that the
# python backend passes by DLPack (FORCE_CPU_ONLY_INPUT_TENSORS=no is set in the model config).
FROM nvcr.io/nvidia/tritonserver:25.01-py3

WORKDIR /opt/lumireg
COPY . /opt/lumireg
# the image's python backend runs the system Python 3.12; lumireg and its server extra go into it.
# The model repository is owned by root and read-only: the server (not root) can load it, never change it.
RUN python3 -m pip install --no-cache-dir '.[server]' \
 && lumireg export --variant onnx --repository /opt/lumireg/models \
 && chmod -R a-w,a+rX /opt/lumireg/models \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lumireg

USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s CMD curl -fs localhost:8000/v2/health/ready || exit 1
# --model-control-mode=none: models load at start and never over the API (no remote load, unload or swap).
# TLS and the access key (README, "Deploying in a hospital"): mount the certificates and the key file read-only and
# add --grpc-use-ssl-mutual / --grpc-restricted-protocol as lumireg serve does, or run `lumireg serve` instead, on
# this image's Triton: `lumireg serve --tritonserver /opt/tritonserver --repository /opt/lumireg/models ...`, as
# Kubernetes does (deploy/base/deployment.yaml).
# --grpc-http2-min-recv-ping-interval-without-data: lumireg's clients ping every 20 s while a request runs.
CMD ["tritonserver", "--model-repository=/opt/lumireg/models", "--model-control-mode=none", \
     "--cuda-memory-pool-byte-size=0:2147483648", "--allow-gpu-metrics=true", \
     "--grpc-http2-min-recv-ping-interval-without-data=10000"]
