# Set-up and the everyday commands. Every target creates .venv and installs
# lumireg from this repository's own files on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-server-test

.PHONY: bench test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[server,test]'
	touch $@

## bench: time the Triton kernels against the PyTorch reference paths (the main job until `serve` lands)
bench: $(STAMP)
	$(VENV)/bin/lumireg bench --kernels

## test: run the test suite (CPU; the Triton kernels run under TRITON_INTERPRET=1)
test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info
