"""Shared fixtures: the built-in tiny model (built once per session) and a helper to run the recipe for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Gemma-2 model and SentencePiece tokenizer, built locally by training/tiny.py."""
    from training.tiny import build_tiny_model

    path = Path(os.environ.get("TINY_MODEL_DIR", REPO / "models" / "tiny-gemma2"))
    return build_tiny_model(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def run_recipe(args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 600,
               script: bool = False) -> subprocess.CompletedProcess:
    """Run the training CLI in a real subprocess, as a user would."""
    cmd = [sys.executable, "training/qlora_finetune.py"] if script else [sys.executable, "-m",
                                                                         "training.qlora_finetune"]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def recipe():
    return run_recipe
