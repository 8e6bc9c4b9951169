# lumireg on a production GPU host: NVIDIA Triton Inference Server with lumireg's
# kernels available to python-backend models.
#
#   docker build -t lumireg .
#   docker run --gpus all --shm-size 1g -p 8000:8000 -p 8001:8001 -p 8002:8002 lumireg
#
# The server image's python backend runs Python 3.12 with its own interpreter;
# lumireg and its server extra are installed into it.
FROM nvcr.io/nvidia/tritonserver:25.01-py3

WORKDIR /opt/lumireg
COPY . /opt/lumireg
RUN python3 -m pip install --no-cache-dir '.[server]'

ENV FORCE_CPU_ONLY_INPUT_TENSORS=no
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/opt/lumireg/model_repository", \
     "--cuda-memory-pool-byte-size=0:536870912"]
