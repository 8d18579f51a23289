#!/usr/bin/env bash
# Create the virtual environment and install the package with the right PyTorch build:
#   TORCH_INDEX_URL set     -> torch from that index
#   nvidia-smi works        -> a CUDA 12.6 build (https://download.pytorch.org/whl/cu126)
#   otherwise (CPU host)    -> a CPU wheel already on disk (pip's find-links) if there is one, else the CPU index
# then the package with EXTRAS (default dev,wandb: what the tests use).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch>=2.6,<2.15"}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: $PYTHON is missing or older than 3.10; install Python 3.10+ or pass PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "torch already installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing a CUDA 12.6 build of torch"
  "${PIP[@]}" "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cu126
elif local_dir=$(mktemp -d) && "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-index --no-deps \
       "$TORCH_SPEC" -d "$local_dir" >/dev/null 2>&1; then
  echo "no GPU: installing the CPU torch wheel found on disk ($(basename "$local_dir"/torch-*.whl))"
  "${PIP[@]}" "$local_dir"/torch-*.whl
else
  echo "no GPU: installing a CPU build of torch"
  "${PIP[@]}" "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
fi
"${PIP[@]}" -e ".[${EXTRAS:-dev,wandb}]"
echo "ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
