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
def bnb_warm():
    """bitsandbytes' CPU 8-bit optimizer step, multi-threaded, can give a slightly different result (~3e-6) on its
    first call in a process, for its own optimizer too (2 of 20 fresh processes; none of 20 with OMP_NUM_THREADS=1,
    as the recipe's end-to-end tests run): tests that compare two optimizers bit for bit in one process call it once
    first."""
    import bitsandbytes as bnb
    import torch

    p = torch.nn.Parameter(torch.ones(4096))
    p.grad = torch.ones(4096)
    bnb.optim.AdamW([p], optim_bits=8).step()


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


def run_make(args: list[str], env: dict | None = None, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """A native make verb as a user types it, on the venv that runs the tests (never re-running `make setup`)."""
    venv = Path(sys.executable).parent.parent
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(["make", "--no-print-directory", "-o", f"{venv}/.installed", f"VENV={venv}", *args],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, **kw)


def optimizer_moment_layout(optimizer_pt: Path) -> tuple[int, int, int]:
    """A checkpoint's bitsandbytes optimizer state: (storages behind its 8-bit moments, tensors with 8-bit moments,
    tensors with 32-bit ones). training.optim's flat buffer shows as one storage behind all the 8-bit moments."""
    import torch

    moments = [s["__bnb_optimizer_quant_state__"]["state1"]
               for s in torch.load(optimizer_pt, weights_only=True)["state"].values()]
    eight = [m for m in moments if m.dtype == torch.uint8]
    return len({m.untyped_storage().data_ptr() for m in eight}), len(eight), len(moments) - len(eight)


def reference_greedy(base_dir: Path, adapter_dir: Path, prompt: str, max_new_tokens: int,
                     merged: bool = False) -> tuple[str, list[int]]:
    """What plain transformers + peft say for `prompt`: the base in 4-bit as trained (merged: in float32, the
    adapter merged into it), the adapter on, greedy `model.generate`, the run's chat template; the answer without
    its end-of-turn token, and the new token ids."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=None if merged else quant,
                                                dtype=torch.float32, attn_implementation="eager",
                                                device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if merged:
        model = model.merge_and_unload()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>" if "<|im_start|>" in text else "<end_of_turn>")
    stop = [end_of_turn, tok.eos_token_id]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode([t for t in new if t not in stop], skip_special_tokens=True), new


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A real 20-step QLoRA run of the tiny model, shared by the chat/eval and export tests (they only read it or
    add their own files): <root>/outputs/tiny-run/ (adapter, run_summary.json, eval.json: the tiny preset has an
    eval split, report/) and <root>/logs/tiny-run/."""
    root = tmp_path_factory.mktemp("tiny-run")
    proc = run_recipe(["--model-config", "tiny", "--output-dir", str(root / "outputs" / "tiny-run"),
                       "--logs-dir", str(root / "logs"), "--max-steps", "20", "--resume", "never"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root
