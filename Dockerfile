# QLoRA training image: builder (venv + wheels) -> runtime (venv + code, non-root, no compilers).
# Export image (`--target export`, `make train-export`): runtime + llama-cpp-python + llama.cpp's GGUF converter.
# Build through `make build` (it passes the host user's UID/GID and the CA bundle), or:
#   DOCKER_BUILDKIT=1 docker compose -f docker-compose.training.yml build
# BuildKit is required (cache and secret mounts). No `# syntax=` line: that frontend image may not be pullable.

# CUDA 12.6 runtime userland; torch wheels bring their own cuDNN/cuBLAS, so the smaller non-cudnn image is enough.
# Any Debian/Ubuntu image with apt works (CI uses a debootstrap-made `local/debian:bookworm` and CPU torch).
ARG BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------- python-base
FROM ${BASE_IMAGE} AS python-base
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------- requirements
# The dependency list, extracted from pyproject.toml: edits elsewhere in pyproject.toml keep the venv layer cached.
# (tomllib: Python >= 3.11; pip's vendored tomli on 3.10 bases such as Ubuntu 22.04.)
FROM python-base AS requirements
ARG EXTRAS=notebook
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import os, sys; \
toml = __import__("tomllib") if sys.version_info >= (3, 11) else __import__("pip._vendor.tomli", fromlist=["loads"]); \
p = toml.load(open("/tmp/pyproject.toml", "rb"))["project"]; \
extras = [e.strip() for e in os.environ.get("EXTRAS", "").split(",") if e.strip()]; \
reqs = list(p.get("dependencies", [])) + [r for e in extras for r in p["optional-dependencies"][e]]; \
open("/requirements.txt", "w").write("\n".join(reqs) + "\n"); \
torch = [r for r in reqs if r.replace(" ", "").lower().startswith(("torch>", "torch<", "torch=", "torch!", "torch~"))]; \
open("/torch-requirement.txt", "w").write("\n".join(torch or ["torch"]) + "\n")'

# ---------------------------------------------------------------------------------------------- builder
FROM python-base AS builder
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120

# torch first, in its own layer: the biggest download, and it changes least often.
# TORCH_SPEC empty -> pyproject.toml's torch requirement. TORCH_INDEX_URL empty -> PyPI + wheelhouse/ only
# (CI: the CPU wheel in wheelhouse/ with TORCH_SPEC=torch==2.13.0).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC=
COPY --from=requirements /torch-requirement.txt /opt/torch-requirement.txt
# The CA bundle (secret `ca`, optional) lets pip through TLS-inspecting proxies; it is never written to a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,required=false \
    --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    set --; \
    if [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple; fi; \
    if [ -n "$TORCH_SPEC" ]; then set -- "$@" "$TORCH_SPEC"; else set -- "$@" -r /opt/torch-requirement.txt; fi; \
    pip install --find-links /wheelhouse "$@" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && pip freeze | grep -i '^torch==' > /opt/torch-constraint.txt

# The project's dependencies (+ setuptools/wheel: the project wheel below builds without an isolated env, faster).
# The constraint keeps the torch chosen above (the plain `torch` requirement would
# otherwise be free to pull another multi-GB build).
COPY --from=requirements /requirements.txt /opt/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,required=false \
    --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --find-links /wheelhouse -c /opt/torch-constraint.txt -r /opt/requirements.txt "setuptools>=68" wheel

# ---------------------------------------------------------------------------------------------- project
# The project as a wheel, in its own stage: editing training/*.py rebuilds only this and one small runtime layer,
# never the multi-GB venv layer.
FROM builder AS project
WORKDIR /src
COPY pyproject.toml README* ./
COPY training/ ./training/
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# Only the interpreter, CA roots and libgomp (1.4 MB; llama.cpp in the export image needs it, and installing it
# here keeps apt out of the export stage, which is rebuilt after each code edit): no compilers, no pip cache.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates libgomp1 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*

# Non-root user; UID/GID default to the host user's via `make build`, so files written to bind mounts are theirs.
ARG APP_UID=1000
ARG APP_GID=1000
RUN set -e; \
    if [ "$APP_UID" = 0 ] || [ "$APP_GID" = 0 ]; then \
        echo "APP_UID/APP_GID must not be 0: the container runs as a non-root user" >&2; exit 1; fi; \
    old_user="$(getent passwd "$APP_UID" | cut -d: -f1)"; [ -z "$old_user" ] || userdel -r "$old_user" 2>/dev/null || true; \
    getent group "$APP_GID" >/dev/null || groupadd -g "$APP_GID" app; \
    useradd -u "$APP_UID" -g "$APP_GID" -m -d /home/app -s /bin/bash app; \
    mkdir -p /app/outputs /app/logs /app/backup /app/models/gguf /app/models/hf /app/datasets /app/notebooks /app/base-model; \
    chown -R "$APP_UID:$APP_GID" /app

COPY --from=builder /opt/venv /opt/venv
RUN --mount=type=bind,from=project,source=/wheels,target=/tmp/wheels \
    /opt/venv/bin/pip install --no-deps --no-index /tmp/wheels/*.whl \
 && /opt/venv/bin/python -c "import training"
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

# ---------------------------------------------------------------------------------------------- export-builder
# llama-cpp-python compiled once, CPU only (quantisation and the export's own check; the GGUF is served by the
# user's llama.cpp or Ollama, not here) and portable (-DGGML_NATIVE=OFF: a native build crashed on AMX CPUs).
# A matching wheel in wheelhouse/ skips the compile (CI builds one for its venv and reuses it here).
FROM builder AS export-builder
ARG DEBIAN_FRONTEND=noninteractive
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
# The source package once: the wheel is built from it and llama.cpp's convert_hf_to_gguf.py is unpacked from it.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,required=false \
    --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    sdist=llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}.tar.gz; mkdir -p /sdist; \
    if [ -f "/wheelhouse/$sdist" ]; then cp "/wheelhouse/$sdist" /sdist/; \
    else pip download --no-deps --no-binary llama-cpp-python -d /sdist "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"; fi \
 && CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel --find-links /wheelhouse --find-links /sdist -w /export-wheels \
      "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" "requests>=2.31,<3"
# After the compile, so that code edits do not redo it: the converter, checked against the published sha256.
COPY training/ /src/training/
RUN cd /src && python -m training.export --fetch-converter --converter-dir /opt/llama-cpp-converter \
      --converter-sdist /sdist/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}.tar.gz

# ---------------------------------------------------------------------------------------------- export
# The training runtime plus what export needs; the training image itself stays without them.
FROM runtime AS export
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
USER root
# --no-index: only the wheels built above; requirements the venv already satisfies (numpy, jinja2) are kept.
RUN --mount=type=bind,from=export-builder,source=/export-wheels,target=/tmp/export-wheels \
    /opt/venv/bin/pip install --no-index --no-cache-dir --find-links /tmp/export-wheels \
      "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" "requests>=2.31,<3" \
 && /opt/venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
COPY --from=export-builder /opt/llama-cpp-converter /opt/llama-cpp-converter
ENV LLAMA_CPP_CONVERTER_DIR=/opt/llama-cpp-converter
USER app
LABEL org.opencontainers.image.title="qlora-training-export" \
      org.opencontainers.image.description="QLoRA stack export: merge, GGUF conversion and checks (llama-cpp-python)"
CMD ["python", "-m", "training.export", "--help"]

# ---------------------------------------------------------------------------------------------- training
# The last stage, so that a plain `docker build .` gives the training image (compose names it: target: training).
FROM runtime AS training
