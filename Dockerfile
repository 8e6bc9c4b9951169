# lumireg on a production GPU host: NVIDIA Triton Inference Server with the network in Triton's
# onnxruntime backend and lumireg's post-processing (Triton kernels on GPU tensors) in the python backend.
#
#   docker build -t lumireg .
#   docker run --rm --gpus all --shm-size 2g -p 8000:8000 -p 8001:8001 -p 8002:8002 lumireg
#
# A TensorRT plan instead of the ONNX network (built on the serving GPU, at start, into a writable folder: the
# image's repository is read-only):
#   docker run --rm --gpus all --shm-size 2g -p 8000-8002:8000-8002 -e LUMIREG_MODELS=/tmp/models lumireg \
#     sh -c 'lumireg export --trt --fp16 --repository /tmp/models && exec /opt/lumireg/docker-serve.sh'
#
# --shm-size: the python backend hands tensors between Triton and its stub processes through /dev/shm
# (a batch of 8 float32 fields is 660 MB). docker-serve.sh gives every GPU a CUDA memory pool for the GPU tensors
# the python backend passes by DLPack (FORCE_CPU_ONLY_INPUT_TENSORS=no is set in the model config).
FROM nvcr.io/nvidia/tritonserver:25.01-py3

# The TensorRT this image ships, per NVIDIA's Triton release notes (25.01: Triton 2.54.0, Ubuntu 24.04, CUDA
# 12.8.0.38, TensorRT 10.8.0.43); the build stops if the image's libnvinfer says otherwise. A plan only loads in
# the TensorRT that built it, so `lumireg export --trt` must build with this version.
ARG TENSORRT_VERSION=10.8.0.43

# Triton's JIT compiles a small C launcher for the kernels at first use: it needs a C compiler and Python.h.
# Versions unpinned (DL3008): the base image's tag fixes the Ubuntu release and its security updates come through.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lumireg
COPY . /opt/lumireg
# The python backend's stub embeds the image's system Python 3.12, so lumireg goes into that interpreter: a venv
# would be invisible to the stub. Ubuntu marks it externally managed (PEP 668); --break-system-packages is safe
# here since the image runs one application and nothing of Ubuntu's uses these packages. The `image` extra has no
# nvidia-pytriton: this image has its own tritonserver. The tensorrt wheel (for `lumireg export --trt`) is the
# image's own TensorRT version. The model repository is owned by root and read-only: the server (not root) can
# load it, never change it. DL3013: the extra's versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN trt=$(python3 -c 'import ctypes; v = ctypes.CDLL("libnvinfer.so.10").getInferLibVersion(); print(f"{v // 10000}.{v // 100 % 100}.{v % 100}")') \
 && case "$TENSORRT_VERSION" in "$trt".*) ;; *) echo "this image has TensorRT $trt: build with --build-arg TENSORRT_VERSION=$trt.<build>" >&2; exit 1 ;; esac \
 && python3 -m pip install --no-cache-dir --break-system-packages '.[image]' "tensorrt-cu12==$TENSORRT_VERSION" \
 && lumireg export --variant onnx --repository /opt/lumireg/models \
 && chmod -R a-w,a+rX /opt/lumireg/models \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lumireg

USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s CMD ["sh", "-c", "curl -fs localhost:8000/v2/health/ready || exit 1"]
# TLS and the access key (README, "Deploying in a hospital"): mount the certificates and the key file read-only and
# add --grpc-use-ssl-mutual / --grpc-restricted-protocol as lumireg serve does, or run `lumireg serve` instead, on
# this image's Triton: `lumireg serve --tritonserver /opt/tritonserver --repository /opt/lumireg/models ...`, as
# Kubernetes does (deploy/base/deployment.yaml). docker-serve.sh holds tritonserver's flags; arguments are added.
CMD ["/opt/lumireg/docker-serve.sh"]
