# Docker Compose verbs (included by the top-level Makefile). README_DOCKER.md explains the stack.
# Variables: GPU=auto|1|0  UNSLOTH=1  MODEL=  DATA=  RUN=  ARGS='--max-steps 50'  FORCE=1  BACKUP=1  IMAGE  BIND_ADDRESS
#            GPUS=N FSDP=1 NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT (several GPUs: LAUNCH, from the Makefile)
# Every recipe only calls `docker compose`, so `make -n VERB` works on a machine without Docker.

DOCKER ?= docker
COMPOSE_MAIN_FILE ?= docker-compose.training.yml
# GPU=auto adds docker-compose.gpu.yml when `nvidia-smi` answers; GPU=1 forces it, GPU=0 keeps the stack on the CPU.
GPU ?= auto
ifeq ($(GPU),auto)
GPU_ON := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(GPU_ON),1)
ifeq ($(shell command -v nvidia-container-runtime-hook nvidia-ctk nvidia-container-toolkit 2>/dev/null),)
$(warning An NVIDIA GPU answers but no NVIDIA Container Toolkit was found: containers will fail with 'could not select device driver "nvidia"'. Install it (README_DOCKER.md, GPU not found) or use GPU=0.)
endif
endif
else
GPU_ON := $(GPU)
endif
COMPOSE_FILES := -f $(COMPOSE_MAIN_FILE) $(if $(filter 1 yes true,$(GPU_ON)),-f docker-compose.gpu.yml) \
  $(if $(filter-out 1,$(NNODES)),-f docker-compose.multinode.yml)
COMPOSE := $(DOCKER) compose $(COMPOSE_FILES)
ALL_PROFILES := --profile training --profile training-dev --profile monitoring

# BuildKit: cache and secret mounts in the Dockerfile.
export DOCKER_BUILDKIT := 1
export COMPOSE_DOCKER_CLI_BUILD := 1
# The image's user gets the host user's ids (files in bind mounts stay the user's); root on the host maps to 1000,
# because the container never runs as root.
HOST_UID := $(shell id -u 2>/dev/null || echo 1000)
HOST_GID := $(shell id -g 2>/dev/null || echo 1000)
APP_UID ?= $(if $(filter 0,$(HOST_UID)),1000,$(HOST_UID))
APP_GID ?= $(if $(filter 0,$(HOST_GID)),1000,$(HOST_GID))
# CA bundle handed to the build as a secret (corporate proxies); /dev/null when the host has none.
CA_BUNDLE ?= $(firstword $(wildcard /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem) /dev/null)
# The GPU image (docker-compose.gpu.yml) installs the fast path: Liger kernels (extra `gpu`) and FlashAttention 4
# (extra `fa4`; FA4=0 leaves it out: its compiler is under NVIDIA's software licence); UNSLOTH=1 adds unsloth
# (extra `fast`: only for --set backend=unsloth; parts of it are LGPL-3.0/AGPL-3.0, so it is off by default).
UNSLOTH ?= 0
FA4 ?= 1
comma := ,
GPU_EXTRAS ?= notebook,gpu$(if $(filter 1 yes true,$(FA4)),$(comma)fa4)$(if $(filter 1 yes true,$(UNSLOTH)),$(comma)fast)
export GPU_EXTRAS
CONTAINER_PREFIX ?= agent
VOLUME_PREFIX ?= training
export APP_UID APP_GID CA_BUNDLE CONTAINER_PREFIX VOLUME_PREFIX
JUPYTER_TOKEN_FILE ?= .jupyter_token
BIND_ADDRESS ?= 127.0.0.1
JUPYTER_PORT ?= 8888
TENSORBOARD_PORT ?= 6006
WANDB_PORT ?= 8080
export BIND_ADDRESS JUPYTER_PORT TENSORBOARD_PORT WANDB_PORT
# Compose secrets (docker-compose.training.yml): the tokens reach the containers as files, never as environment.
# Exported even when unset (empty: no secret file), since Compose refuses an unset secret variable.
HF_TOKEN ?=
WANDB_API_KEY ?=
export HF_TOKEN WANDB_API_KEY
TRAINING_CONTAINER = $(CONTAINER_PREFIX)-qlora-training
# ./notebooks is bind-mounted into the dev service; as root on the host, hand it to the container user.
NOTEBOOKS_DIR_READY = mkdir -p notebooks && { [ "$(HOST_UID)" != 0 ] || chown $(APP_UID):$(APP_GID) notebooks; }

# A host path given as DATA= / MODEL= is bind-mounted read-only. Any other MODEL (a hub id) is passed as is, unless it
# reads as a path (/..., ./..., ../...); any other DATA is refused on the host (the recipe reads files only). Paths
# inside the image (/app/...) pass as they are.
# Only values the user gave count (a DATA or MODEL set in a Makefile is not the user's).
USER_DATA := $(if $(filter command line environment environment override,$(origin DATA)),$(DATA))
USER_MODEL := $(if $(filter command line environment environment override,$(origin MODEL)),$(MODEL))
DATA_PATH := $(patsubst %/,%,$(USER_DATA))
MODEL_PATH := $(patsubst %/,%,$(USER_MODEL))
DATA_MOUNT := $(if $(and $(DATA_PATH),$(wildcard $(DATA_PATH))),DATASETS_DIR=$(abspath $(dir $(DATA_PATH))))
DATA_ARG := $(if $(DATA_PATH),--data $(if $(wildcard $(DATA_PATH)),/app/datasets/$(notdir $(DATA_PATH)),$(DATA_PATH)))
DATA_MISSING := $(and $(DATA_PATH),$(if $(wildcard $(DATA_PATH)),,1),$(filter-out /app/%,$(DATA_PATH)))
MODEL_MISSING := $(and $(MODEL_PATH),$(if $(wildcard $(MODEL_PATH)),,1),$(filter-out /app/%,$(filter /% ./% ../%,$(MODEL_PATH))))
MODEL_MOUNT := $(if $(and $(MODEL_PATH),$(wildcard $(MODEL_PATH))),BASE_MODEL_DIR=$(abspath $(MODEL_PATH)))
MODEL_IN_CONTAINER := $(if $(MODEL_PATH),$(if $(wildcard $(MODEL_PATH)),/app/base-model,$(MODEL_PATH)))
MODEL_ARG := $(if $(MODEL_PATH),--model $(MODEL_IN_CONTAINER))

# $(1): preset. Refuses to replace a running run; starts the run and its sidecars in the background, then follows
# the log until the run ends (Ctrl-C stops following, not training) and exits with the run's exit code.
# `docker logs -f` (not `compose logs -f`, which waits for a restart): it returns once the container has stopped.
define compose_train
	@if [ -n "$(DATA_MISSING)" ]; then \
	  echo "DATA=$(DATA_PATH): no such file or folder on this host. DATA is your training data: a .jsonl/.json/.parquet/.csv file or a folder of them (mounted read-only into the container)." >&2; exit 2; fi
	@if [ -n "$(MODEL_MISSING)" ]; then \
	  echo "MODEL=$(MODEL_PATH): no such folder on this host. MODEL is a Hugging Face model id (google/gemma-2-2b) or a local folder with config.json and the weights." >&2; exit 2; fi
	@if [ -n "$$($(COMPOSE) --profile training ps -q --status running qlora-training 2>/dev/null)" ]; then \
	  echo "A training run is already running in $(TRAINING_CONTAINER): 'make train-logs' follows it, 'make train-stop' stops it." >&2; exit 1; fi
	$(DATA_MOUNT) $(MODEL_MOUNT) LAUNCH='$(LAUNCH)' PRESET=$(1) TRAIN_ARGS='$(strip $(MODEL_ARG) $(DATA_ARG) $(if $(RUN),--run-name $(RUN)) $(ARGS))' $(COMPOSE) --profile training up -d
	@echo "Training runs in the background; Ctrl-C stops following the log, 'make train-stop' stops the run."
	$(DOCKER) logs -f --since "$$($(DOCKER) inspect -f '{{.State.StartedAt}}' $(TRAINING_CONTAINER))" $(TRAINING_CONTAINER); exit $$($(DOCKER) inspect -f '{{.State.ExitCode}}' $(TRAINING_CONTAINER))
endef

# `docker compose run` of service $(2) (profile $(1)) with command $(3) (and run options $(4)), exiting with the
# command's own status:
# some Compose versions (seen: v2.40.3 on engine 20.10) return 0 from `run` whatever the container's exit code.
# A container that never ran (no exit code) keeps Compose's status, or 1 if Compose said 0.
define compose_run
	name=$(CONTAINER_PREFIX)-$(2)-run-$$$$; trap '$(DOCKER) rm -f '"$$name"' >/dev/null 2>&1' EXIT; \
	  $(COMPOSE) --profile $(1) run --name "$$name" --no-deps -T $(4) $(2) $(3); rc=$$?; \
	  code="$$($(DOCKER) inspect -f '{{if eq .State.Status "exited"}}{{.State.ExitCode}}{{end}}' "$$name" 2>/dev/null)"; \
	  exit "$${code:-$$(( rc ? rc : 1 ))}"
endef

.PHONY: build train-gemma-2b train-gemma-9b train-custom train-tiny train-dev train-monitor train-status train-logs \
        train-stop train-clean doctor

build: ## build the training image (GPU host: + Liger, FlashAttention 4 (FA4=0: without); UNSLOTH=1 adds unsloth; GPU=0/1, TORCH_INDEX_URL=, TORCH_SPEC=, BASE_IMAGE=)
	@mkdir -p wheelhouse
	$(COMPOSE) $(ALL_PROFILES) build qlora-training

train-gemma-2b: ## QLoRA fine-tune Gemma-2 2B in the container (needs HF_TOKEN; ARGS='--max-steps 50')
	$(call compose_train,gemma-2b)

train-gemma-9b: ## QLoRA fine-tune Gemma-2 9B in the container (needs HF_TOKEN)
	$(call compose_train,gemma-9b)

train-custom: ## fine-tune any model: make train-custom MODEL=hub-id-or-path DATA=file-or-folder
	@if [ -z "$(USER_MODEL)" ] || [ -z "$(USER_DATA)" ]; then \
	  echo "train-custom needs MODEL and DATA, e.g. make train-custom MODEL=google/gemma-2-2b DATA=datasets/my.jsonl" >&2; \
	  echo "  MODEL: a Hugging Face model id or a local folder; DATA: a .jsonl/.json/.parquet/.csv file or folder" >&2; exit 2; fi
	$(call compose_train,custom)

train-tiny: ## the built-in tiny model on the sample data, through compose (CPU; ARGS='--max-steps 10' for a smoke test)
	$(call compose_train,tiny)

train-dev: ## JupyterLab + TensorBoard (token from JUPYTER_TOKEN, else generated into .jupyter_token)
	@$(NOTEBOOKS_DIR_READY)
	@if [ -z "$$JUPYTER_TOKEN" ] && [ ! -s $(JUPYTER_TOKEN_FILE) ]; then \
	  (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > $(JUPYTER_TOKEN_FILE)); fi
	JUPYTER_TOKEN="$${JUPYTER_TOKEN:-$$(cat $(JUPYTER_TOKEN_FILE))}" $(COMPOSE) --profile training-dev up -d
	@token="$${JUPYTER_TOKEN:-$$(cat $(JUPYTER_TOKEN_FILE))}"; \
	  echo "JupyterLab:  http://$(BIND_ADDRESS):$(JUPYTER_PORT)/lab?token=$$token"; \
	  echo "Quickstart:  http://$(BIND_ADDRESS):$(JUPYTER_PORT)/lab/tree/notebooks/quickstart.ipynb?token=$$token"; \
	  echo "TensorBoard: http://$(BIND_ADDRESS):$(TENSORBOARD_PORT)/"; \
	  echo "Jupyter token: $$token (in $(JUPYTER_TOKEN_FILE) unless JUPYTER_TOKEN was set)"

train-monitor: ## W&B local server (8080) + Jupyter/TensorBoard + GPU monitor
	@$(MAKE) --no-print-directory train-dev
	$(COMPOSE) --profile monitoring up -d
	@echo "W&B local:   http://$(BIND_ADDRESS):$(WANDB_PORT)/"

# With ARGS=--json stdout is the JSON object alone (make -s: without make's own lines), for scripts.
train-status: ## containers, GPUs, the current run, checkpoints and backups on one screen (RUN=name, ARGS=--json)
	$(if $(findstring --json,$(ARGS)),,$(COMPOSE) $(ALL_PROFILES) ps -a)
	@$(NOTEBOOKS_DIR_READY); ids="$$($(COMPOSE) $(ALL_PROFILES) ps -aq)"; \
	  { if [ -n "$$ids" ]; then $(DOCKER) inspect $$ids; else echo '[]'; fi; } | ( $(call compose_run,training-dev,training-dev,\
	    python -m training.status --docker-inspect - --logs-dir /app/logs --output-dir /app/outputs --backup-dir /app/backup \
	    $(if $(RUN),--run $(RUN)) $(ARGS),-e COLUMNS="$$(tput cols 2>/dev/null || echo 100)") )

train-logs: ## follow the training container's log (Ctrl-C to stop following; returns when the run ends)
	$(DOCKER) logs -f --tail 200 $(TRAINING_CONTAINER)

train-stop: ## stop every service (SIGTERM: the run saves a checkpoint first; containers and volumes kept)
	$(COMPOSE) $(ALL_PROFILES) stop

train-clean: ## remove containers and volumes (checkpoints!); asks unless FORCE=1; keeps backups unless BACKUP=1
	@if [ "$(FORCE)" != 1 ]; then \
	  printf 'This deletes the containers and the volumes %s_{models_cache,models_gguf,checkpoints,logs,wandb}%s.\nType yes to go on: ' \
	    "$(VOLUME_PREFIX)" "$(if $(filter 1,$(BACKUP)), and $(VOLUME_PREFIX)_backup)"; \
	  read answer; [ "$$answer" = yes ] || { echo "Nothing deleted."; exit 1; }; fi
	$(COMPOSE) $(ALL_PROFILES) down --remove-orphans
	$(DOCKER) volume rm -f $(foreach v,models_cache models_gguf checkpoints logs wandb $(if $(filter 1,$(BACKUP)),backup),$(VOLUME_PREFIX)_$(v))

doctor: ## check the host for the Docker stack (driver, GPU runtime, Compose v2, compose file, security, disk)
	python3 scripts/test_docker_training.py $(if $(filter 1 yes true,$(GPU_ON)),,--cpu-only) --compose-file $(COMPOSE_MAIN_FILE) \
	  $(if $(filter command line environment,$(origin PRESET)),--preset $(PRESET)) $(if $(USER_MODEL),--model $(USER_MODEL))

.PHONY: train-export
train-export: ## merge + GGUF + Ollama Modelfile in a container, checked (RUN=name FORMAT=gguf|merged QUANT=q8_0|...)
	$(COMPOSE) --profile export build qlora-export
	$(if $(MODEL_MOUNT),export $(MODEL_MOUNT);) $(call compose_run,export,qlora-export,python -m training.export $(if $(RUN),--run $(RUN)) \
	  --format $(or $(FORMAT),gguf) --quant $(or $(QUANT),q8_0) --output-dir /app/outputs --gguf-dir /app/models/gguf \
	  $(if $(MODEL_PATH),--base $(MODEL_IN_CONTAINER)) $(ARGS))

.PHONY: train-chat
CHAT_CMD = python -m training.chat $(if $(RUN),--run $(RUN)) --output-dir /app/outputs
train-chat: ## chat with a run's adapter in a container: make train-chat RUN=name [PROMPT="..."] [ARGS='--greedy --merged']
	$(if $(PROMPT),$(call compose_run,training,qlora-training,$(CHAT_CMD) --prompt "$$PROMPT" $(ARGS)),$(COMPOSE) --profile training run --rm --no-deps qlora-training $(CHAT_CMD) $(ARGS))

.PHONY: backup-now backup-verify restore
backup-now: ## copy new complete checkpoints to the backup volume now (verified; waits for a running backup)
	$(call compose_run,training,training-backup,python -m training.backup run --source /app/outputs --dest /app/backup --once)

backup-verify: ## re-hash every backed-up file; lists each damaged one (non-zero exit if any)
	$(call compose_run,training,training-backup,python -m training.backup verify --dest /app/backup)

restore: ## put a run's newest intact backup (or CHECKPOINT=checkpoint-N) back: make restore RUN=name
	@test -n "$(RUN)" || { echo "usage: make restore RUN=<run> [CHECKPOINT=checkpoint-N]" >&2; exit 2; }
	$(call compose_run,training,training-backup,python -m training.backup restore --dest /app/backup --to /app/outputs $(RUN) $(CHECKPOINT))
