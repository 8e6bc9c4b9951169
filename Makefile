# Set-up and the everyday commands. Every target creates .venv and installs
# lumireg from this repository's own files on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-server-test
# the exported network the server loads (lumireg export writes it from the bundled weights)
NETWORK := model_repository/lumireg_network/1/model.onnx

.PHONY: serve bench test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[server,test]'
	touch $@

$(NETWORK): $(STAMP) network/weights/lumireg-default.pt network/model.py export/onnx.py export/repository.py
	$(VENV)/bin/lumireg export

## serve: the main job: Triton Inference Server on the bundled model, gRPC 127.0.0.1:8001 (SERVE_ARGS="--host 0.0.0.0 ...")
serve: $(NETWORK)
	$(VENV)/bin/lumireg serve $(SERVE_ARGS)

## bench: time the Triton kernels against the PyTorch reference paths
bench: $(STAMP)
	$(VENV)/bin/lumireg bench kernels

## test: lint and format check (ruff), then the test suite (CPU; the Triton kernels run under TRITON_INTERPRET=1)
test: $(STAMP) $(NETWORK)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info $(addprefix $(dir $(NETWORK)),model.onnx model.plan model.pt export.json)
