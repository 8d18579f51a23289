"""Tokens: Compose secrets (files under /run/secrets, see docker-compose.training.yml) in the stack, the environment
variable as the fallback for native runs. Values are never logged; only where a token came from is.

HF_TOKEN: huggingface_hub reads the file HF_TOKEN_PATH names (the stack sets /run/secrets/hf_token) or HF_TOKEN.
WANDB_API_KEY: read here from /run/secrets/wandb_api_key and handed to wandb inside the trainer's process only.
"""

from __future__ import annotations

import os
from pathlib import Path

SECRETS_DIR = Path(os.environ.get("SECRETS_DIR", "/run/secrets"))


def read_secret(name: str) -> str | None:
    """The secret `name` (e.g. "WANDB_API_KEY"): SECRETS_DIR/<name lowercased> when it holds a value, else the
    environment variable of that name, else None."""
    try:
        value = (SECRETS_DIR / name.lower()).read_text(encoding="utf-8").strip()
    except OSError:
        value = ""
    return value or os.environ.get(name) or None


def hf_token_source() -> str:
    """Where huggingface_hub finds a token, for the log (never the value)."""
    from huggingface_hub import constants, get_token

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN (environment)"
    if get_token():
        return f"the file {constants.HF_TOKEN_PATH}"
    return "none (public models only; gated ones need HF_TOKEN)"
