# QLoRA training stack. `make help` lists every verb. Native verbs use .venv; docker verbs live in make/docker.mk.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?=
DATA   ?= datasets/sample
PRESET ?= tiny

.PHONY: help setup demo train-native validate-data tiny-model report status export test test-fast

help: ## list the verbs
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z0-9_-]+:.*?## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo ""
	@echo "Variables: PRESET=tiny|gemma-2b|gemma-9b|custom  MODEL=id-or-path  DATA=path  RUN=name  GPUS=n  FORCE=1  FORMAT=gguf|merged  QUANT=q8_0|q4_k_m|f16|bf16|f32"

setup: $(VENV)/.installed ## create .venv and install the package (CUDA torch on a GPU host, CPU torch otherwise)

$(VENV)/.installed: pyproject.toml scripts/setup_venv.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_venv.sh
	@touch $@

demo: setup ## set up, then fine-tune the built-in tiny model on the sample data (CPU, about a minute)
	$(PY) -m training.qlora_finetune --model-config tiny --data $(DATA) --run-name demo --resume never

train-native: setup ## fine-tune natively (no Docker): make train-native PRESET=gemma-2b DATA=...
	$(PY) -m training.qlora_finetune --model-config $(PRESET) --data $(DATA) $(if $(RUN),--run-name $(RUN)) $(if $(MODEL),--model $(MODEL))

validate-data: setup ## check a dataset: formats, counts, token lengths, truncation (DATA=path MODEL=tokenizer)
	$(PY) -m training.data validate $(DATA) $(if $(MODEL),--model $(MODEL))

tiny-model: setup ## build the built-in tiny model into models/tiny-gemma2 (done automatically when needed)
	$(PY) -m training.tiny

report: setup ## plots + summary of a run into outputs/RUN/report/ (RUN=name, default: latest)
	$(PY) -m training.report --logs-dir logs $(if $(RUN),--run $(RUN))

export: setup ## merge + GGUF + Ollama Modelfile, checked against the trained model (RUN=name FORMAT=gguf|merged QUANT=q8_0|q4_k_m|f16|bf16|f32)
	$(PY) -m training.export $(if $(RUN),--run $(RUN)) --format $(or $(FORMAT),gguf) --quant $(or $(QUANT),q8_0)

status: setup ## one screen of truth from the files, without Docker (same as train-status)
	$(PY) -m training.status --logs-dir logs --output-dir outputs --backup-dir backup

test: setup ## run the test suite (Docker tests skip without an engine, except in CI)
	$(PY) -m pytest -q

test-fast: setup ## the tests that need neither Docker nor a training subprocess
	$(PY) -m pytest -q -m "not docker and not slow"

include make/docker.mk
