"""Training backends: the fastest correct one for the card, with a safe fallback.

- `unsloth` (optional extra `fast`): unsloth's fused QLoRA kernels. Chosen by `backend: auto` on CUDA only after
  a one-step self-check passes in a subprocess (so a broken install cannot take the trainer down, and a failed
  check leaves this process unpatched). UNSLOTH_COMPILE_DISABLE=1 is set: its torch.compile path broke on torch 2.11.
- `hf` (what `auto` picks): transformers + peft + bitsandbytes, with Liger kernels on CUDA when installed (fused
  linear cross-entropy with the final soft-cap, never materialising the 256k-vocab logits; RMSNorm, GeGLU, RoPE),
  flex attention (`attn_implementation: auto`, after its own self-check), the fused LoRA function
  (training/fast_lora.py) and bf16 norms/embeddings. Measured as fast as unsloth on the H200
  (docs/benchmarks.md), Apache-2.0 only, and exact for packed rows.
- `unsloth` (optional extra `fast`, only when asked for: `--set backend=unsloth`): unsloth's fused QLoRA kernels,
  after a one-step self-check in a subprocess (so a broken install cannot take the trainer down).
  UNSLOTH_COMPILE_DISABLE=1 is set: its torch.compile path broke on torch 2.11. It cannot pack Gemma-2 rows exactly.
All keep Gemma-2's attention logit soft-capping: eager and flex attention apply it (sdpa would drop it), unsloth
has its own soft-capped attention.

    python -m training.backends self-check [--backend unsloth|flex]   # what the choices run before using them
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from training.errors import UserError

log = logging.getLogger("training")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SELF_CHECK_TIMEOUT_S = 600


class BackendError(UserError, RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to use instead."""


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "unsloth" or "hf"
    liger: bool  # hf only: Liger kernels applied
    reason: str

    @property
    def label(self) -> str:
        """What training.model.load_qlora_model takes: unsloth, hf+liger or hf."""
        return "hf+liger" if self.name == "hf" and self.liger else self.name


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_backend(requested: str, device_kind: str, model_type: str | None = None,
                   self_check=None) -> BackendChoice:
    """Decide the backend before anything imports transformers' model code (unsloth patches it on import).
    `liger` here means "installed": `apply_backend` says whether the patch really took."""
    liger = device_kind == "cuda" and _installed("liger_kernel")
    if requested == "hf":
        return BackendChoice("hf", liger, "backend=hf asked for")
    if requested == "auto":
        return BackendChoice("hf", liger, "the project's path: transformers + peft" + (" + Liger" if liger else "")
                             + (", flex attention, fused LoRA" if device_kind == "cuda" else ""))
    if device_kind != "cuda":
        raise BackendError("backend=unsloth needs a CUDA GPU; use --set backend=auto (or hf) on the CPU")
    if model_type not in (None, "gemma2", "gemma", "llama", "mistral", "qwen2", "qwen3"):
        raise BackendError(f"unsloth is not used for model type '{model_type}': use --set backend=auto")
    if not _installed("unsloth"):
        raise BackendError("unsloth is not installed (pip install '.[fast]', or the GPU image built with "
                           "UNSLOTH=1): use --set backend=auto")
    ok, detail = (self_check or run_self_check)("unsloth")
    if ok:
        return BackendChoice("unsloth", False, f"unsloth passed its self-check ({detail})")
    raise BackendError(f"unsloth failed its self-check: {detail}. Use --set backend=auto")


# ------------------------------------------------------------------------------------------------ self-check

def _self_check_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-stack" / "backend_self_check.json"


def _self_check_key(backend: str) -> str:
    """Same backend version, torch, and GPU: same verdict."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        backend_version = version(backend)
    except PackageNotFoundError:
        backend_version = "missing"
    return f"{backend}={backend_version} torch={torch.__version__} gpu={torch.cuda.get_device_name(0)}"


def run_self_check(backend: str) -> tuple[bool, str]:
    """One QLoRA step of `backend` on a small random Gemma-2 in a subprocess; (passed, detail). A pass is cached
    per (backend version, torch version, GPU); a failure is retried next time."""
    cache, key = _self_check_cache(), _self_check_key(backend)
    try:
        cached = json.loads(cache.read_text()).get(key)
    except (OSError, ValueError):
        cached = None
    if cached:
        return True, cached + " (cached)"
    ok, detail = _run_self_check_subprocess(backend)
    if ok:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            old = json.loads(cache.read_text()) if cache.is_file() else {}
            cache.write_text(json.dumps({**old, key: detail}, indent=1))
        except (OSError, ValueError):
            pass
    return ok, detail


def _run_self_check_subprocess(backend: str) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "training.backends", "self-check", "--backend", backend, "--json"]
    env = {**os.environ, "UNSLOTH_COMPILE_DISABLE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SELF_CHECK_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {SELF_CHECK_TIMEOUT_S}s"
    result = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if proc.returncode != 0 or not result:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"exit {proc.returncode}: {tail[0][:300]}"
    return bool(result["ok"]), result["detail"]


def _mini_gemma2(folder: Path) -> Path:
    """A small random Gemma-2 (real head_dim 256 layout, 2 layers) with the tiny tokenizer, for the self-check."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from training.tiny import build_tiny_model, default_dir

    tok_dir = build_tiny_model(default_dir())
    cfg = Gemma2Config(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=256, max_position_embeddings=1024,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(folder))
    for f in tok_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def self_check_step(backend: str) -> dict:
    """unsloth: one forward/backward step; a finite loss near ln(vocab) (random init) and finite, non-zero LoRA
    gradients. flex: flex attention against eager attention on a small Gemma-2 with head_dim 256, soft-capping, a
    sliding window and two packed samples: same loss and input gradients (within bf16 noise)."""
    import torch

    if backend == "flex":
        return _flex_self_check()
    with tempfile.TemporaryDirectory() as tmp:
        path = _mini_gemma2(Path(tmp) / "mini")
        if backend == "unsloth":
            model = load_unsloth(str(path), seq_len=256, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                 gradient_checkpointing=True, seed=0)
        else:
            raise BackendError(f"no self-check for backend '{backend}'")
        model.train()
        ids = torch.randint(3, 512, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        finite = all(g is not None and torch.isfinite(g).all() for g in grads)
        nonzero = any(g is not None and g.abs().sum() > 0 for g in grads)
        value = float(loss.detach())
        near = math.isfinite(value) and abs(value - math.log(512)) < 0.5
        ok = bool(grads) and finite and nonzero and near
        detail = f"loss {value:.4f} vs ln(512)={math.log(512):.4f}, {len(grads)} LoRA grads finite={finite} nonzero={nonzero}"
        return {"ok": ok, "detail": detail, "loss": value}


def _flex_self_check(device: str = "cuda") -> dict:
    """Compiles flex attention's forward and backward kernels for head_dim 256 on this card (a 24 GB card's shared
    memory can be too small for them) and checks them against eager attention, packed rows included."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=64,
                       max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).train()
    ids = torch.randint(3, 512, (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.cat([torch.arange(100), torch.arange(156)]).repeat(2, 1).to(device)  # two packed samples
    results = {}
    for impl in ("eager", "flex_attention"):
        model.set_attn_implementation(impl)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(inputs_embeds=embeds, position_ids=positions, labels=ids).loss
        loss.backward()
        results[impl] = (float(loss.detach()), embeds.grad.float())
    (le, ge), (lf, gf) = results["eager"], results["flex_attention"]
    grad_err = float((ge - gf).norm() / ge.norm().clamp_min(1e-12))
    ok = math.isfinite(lf) and abs(lf - le) <= 2e-3 * abs(le) and grad_err < 0.05
    return {"ok": ok, "detail": f"flex loss {lf:.4f} vs eager {le:.4f}, input-gradient error {grad_err:.2e}",
            "loss": lf}


def resolve_attention(requested: str, device_kind: str, self_check=None) -> tuple[str, str]:
    """`auto`: flex attention on CUDA once its self-check passed on this card (cached), else eager. Both keep
    Gemma-2's soft-cap and are exact for packed rows; flex is faster and never materialises the S x S scores."""
    if requested != "auto":
        return requested, f"attn_implementation={requested} asked for"
    if device_kind != "cuda":
        return "eager", "CPU: eager attention (compiling flex attention for the CPU takes minutes)"
    ok, detail = (self_check or run_self_check)("flex")
    if ok:
        return "flex_attention", f"flex attention passed its self-check ({detail})"
    return "eager", f"flex attention failed its self-check ({detail}); eager attention instead (exact, slower)"


def apply_backend(choice: BackendChoice, model_type: str) -> BackendChoice:
    """Apply what the choice needs before the model is built (Liger patches transformers' classes) and return what
    was really applied: the planner sizes the batch from this, not from what was hoped for."""
    if choice.name != "hf" or not choice.liger:
        return choice
    if apply_liger(model_type):
        return choice
    return dataclasses.replace(choice, liger=False, reason=choice.reason.replace(" + Liger", "") +
                               f" (Liger kernels not applied to '{model_type}': logits are materialised)")


# ------------------------------------------------------------------------------------------------ loading

def apply_liger(model_type: str) -> bool:
    """Patch transformers' model code with Liger kernels; True only when the fused linear cross-entropy (what the
    planner counts on: no materialised logits) was applied. Liger itself only logs for a model it has no kernels for."""
    try:
        import inspect

        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None or "fused_linear_cross_entropy" not in inspect.signature(apply_fn).parameters:
        log.warning("Liger has no fused loss for model type '%s': not applied", model_type)
        return False
    wanted = dict(rope=True, rms_norm=True, fused_linear_cross_entropy=True, cross_entropy=False, geglu=True, swiglu=True)
    try:
        apply_fn(**{k: v for k, v in wanted.items() if k in inspect.signature(apply_fn).parameters})
    except Exception as exc:  # a Liger/transformers version mismatch: run without it, and say so
        log.warning("Liger kernels not applied to %s: %s", model_type, exc)
        return False
    return True


def load_unsloth(model_path: str, seq_len: int, lora_r: int, lora_alpha: int, lora_dropout: float,
                 gradient_checkpointing: bool, seed: int):
    os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=model_path, max_seq_length=seq_len, load_in_4bit=True,
                                                 dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else
                                                 torch.float16, local_files_only=Path(model_path).is_dir())
    return FastLanguageModel.get_peft_model(model, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                            target_modules=LORA_TARGETS, random_state=seed,
                                            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.backends", description="Backend self-check.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("self-check", help="one training step of a backend on a small random Gemma-2")
    c.add_argument("--backend", default="unsloth", choices=("unsloth", "flex"))
    c.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        result = {"ok": False, "detail": "no CUDA GPU visible"}
    else:
        try:
            result = self_check_step(args.backend)
        except Exception as exc:  # the point of the self-check: any failure means "do not use it"
            result = {"ok": False, "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    print(json.dumps(result) if args.json else f"{'PASS' if result['ok'] else 'FAIL'}: {result['detail']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
