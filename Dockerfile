# QLoRA training image: builder (venv + wheels) -> runtime (venv + code, non-root, no compilers).
# Build through `make build` (it passes the host user's UID/GID and the CA bundle), or:
#   DOCKER_BUILDKIT=1 docker compose -f docker-compose.training.yml build
# BuildKit is required (cache and secret mounts). No `# syntax=` line: that frontend image may not be pullable.

# CUDA 12.6 runtime userland; torch wheels bring their own cuDNN/cuBLAS, so the smaller non-cudnn image is enough.
# Any Debian/Ubuntu image with apt works (CI uses a debootstrap-made `local/debian:bookworm` and CPU torch).
ARG BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120

# torch first, in its own layer: the biggest download, and it changes least often.
# TORCH_INDEX_URL empty -> PyPI + wheelhouse/ only (CI: CPU wheel in wheelhouse/, TORCH_SPEC=torch==2.13.0).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC=torch
# The CA bundle (secret `ca`, optional) lets pip through TLS-inspecting proxies; it is never written to a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,required=false \
    --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    set --; \
    if [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple; fi; \
    pip install --find-links /wheelhouse "$@" "$TORCH_SPEC" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && pip freeze | grep -i '^torch==' > /opt/torch-constraint.txt

# Dependencies of the project (with a stub package, so editing training/*.py does not redo this layer).
# The constraint keeps the torch chosen above (a plain `torch` requirement would pull another multi-GB build).
ARG EXTRAS=notebook
WORKDIR /src
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,required=false \
    --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    mkdir -p training && touch training/__init__.py README.md \
 && pip install --find-links /wheelhouse -c /opt/torch-constraint.txt ".${EXTRAS:+[$EXTRAS]}" \
 && rm -rf training README.md build *.egg-info

# The project itself.
COPY pyproject.toml README* ./
COPY training/ ./training/
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --no-deps --force-reinstall . \
 && python -c "import training"

# ---------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# Only the interpreter and CA roots: no compilers, no pip cache, no apt lists.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Non-root user; UID/GID default to the host user's via `make build`, so files written to bind mounts are theirs.
ARG APP_UID=1000
ARG APP_GID=1000
RUN set -e; \
    if [ "$APP_UID" = 0 ] || [ "$APP_GID" = 0 ]; then \
        echo "APP_UID/APP_GID must not be 0: the container runs as a non-root user" >&2; exit 1; fi; \
    old_user="$(getent passwd "$APP_UID" | cut -d: -f1)"; [ -z "$old_user" ] || userdel -r "$old_user" 2>/dev/null || true; \
    old_group="$(getent group "$APP_GID" | cut -d: -f1)"; [ -z "$old_group" ] || groupdel "$old_group" 2>/dev/null || true; \
    groupadd -g "$APP_GID" app; \
    useradd -u "$APP_UID" -g "$APP_GID" -m -d /home/app -s /bin/bash app; \
    mkdir -p /app/outputs /app/logs /app/backup /app/models/gguf /app/models/hf /app/datasets /app/notebooks /app/base-model; \
    chown -R "$APP_UID:$APP_GID" /app

COPY --from=builder /opt/venv /opt/venv
COPY --chown=${APP_UID}:${APP_GID} datasets/sample/ /app/datasets/sample/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/app/models/hf \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

USER app
WORKDIR /app
# No VOLUME line (it would litter anonymous volumes); compose mounts named volumes on these folders, and an
# empty named volume starts with the image folder's ownership (the app user's).
LABEL org.opencontainers.image.title="qlora-training" \
      org.opencontainers.image.description="QLoRA fine-tuning stack (training package, TRL/PEFT/bitsandbytes)"
CMD ["python", "-m", "training.qlora_finetune", "--model-config", "tiny"]
