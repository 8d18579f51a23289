"""Training backends, side by side: each owns its loader and its facts (fused loss, multi-GPU, what was applied).

- `hf` (what `auto` picks): transformers + peft + bitsandbytes, with Liger kernels on CUDA when installed (fused
  linear cross-entropy with the final soft-cap, never materialising the 256k-vocab logits, which training runs on
  the labelled positions only (`lm_head: auto`, training/lm_head.py; TRL's fused head where Liger is not applied);
  RMSNorm, GeGLU, RoPE; Triton's RoPE also where Liger would pick its CuTe DSL one: pin_liger_triton),
  `attn_implementation: auto` (FlashAttention 4 on Hopper/datacenter Blackwell, else flex attention, each after
  its self-check), the fused LoRA function (training/fast_lora.py) and bf16 norms/embeddings. On an H200, in one
  lease, the recipe ran 1.29x unsloth's best setting on that card on full rows, and the same path in the benchmark
  loop 1.99x its real tokens/s on chat data (on an H100: 1.59x and 2.71x; docs/benchmarks.md, 2026-12-07). No
  unsloth code, exact for packed rows, and the one that runs on several GPUs.
- `unsloth` (optional extra `fast`, only when asked for: `--set backend=unsloth`): unsloth's fused QLoRA kernels,
  after a one-step self-check in a subprocess (so a broken install cannot take the trainer down). One GPU only.
  UNSLOTH_COMPILE_DISABLE=1 is set: its torch.compile path broke on torch 2.11. It cannot pack Gemma-2 rows
  exactly, and it ignores some config keys (warned about by name, UNSLOTH_FIXED).
All keep Gemma-2's attention logit soft-capping: eager, flex and FlashAttention 4 apply it (sdpa would drop it), unsloth
has its own soft-capped attention. The planner (training/plan.py) sizes the batch from what a backend *applied*:
a failed Liger patch is planned as materialised logits, and a smaller micro-batch. That is conservative: in
training TRL's fused LM head never materialises them, but the activations of the unfused norms and GeGLU are not
measured.

    python -m training.backends self-check [--backend unsloth|flex|fa4|fa4-window]   # what the choices run before using them
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import ClassVar, Union
from pathlib import Path
from training.errors import UserError
from training.jsonio import write_json_atomic
from training.model import AttentionShape

log = logging.getLogger("training")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SELF_CHECK_TIMEOUT_S = 600


class BackendError(UserError, RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to use instead."""


# ------------------------------------------------------------------------------------------------ backends

@dataclass(frozen=True)
class HFBackend:
    """transformers + peft + bitsandbytes, with Liger's kernels when they were applied."""

    liger: bool  # Liger kernels: "installed" from choose_backend, "applied" after apply_backend
    reason: str
    name: ClassVar[str] = "hf"
    multi_gpu: ClassVar[bool] = True  # DDP and FSDP

    @property
    def label(self) -> str:
        return "hf+liger" if self.liger else "hf"

    @property
    def fused_loss(self) -> bool:
        """What the planner counts on: no materialised logits. Only with Liger's kernels applied: in training TRL's
        fused head never materialises the logits either, but the unfused norms and GeGLU need more memory, which is
        not measured, so a failed Liger patch is planned conservatively, as materialised logits."""
        return self.liger

    def configure(self, cfg, device_kind: str, shape: AttentionShape = AttentionShape()):
        """The config this backend trains with: the attention that will run (auto on CUDA: FA4 where it can train,
        else flex, after their self-checks; FA4 or flex by name: self-checked, refused if the check fails).
        `shape`: the base model's attention (training.model.attention_shape_of), which the self-checks are built
        with; where a sample can outgrow its sliding window, FA4's windowed kernel is what is checked. The LM head
        is resolved too (resolve_lm_head), so the trainer never sees `auto`."""
        window = shape.sliding_window
        binds = window is not None and cfg.max_seq_length > window
        attention, why = resolve_attention(cfg.attn_implementation, device_kind,
                                           window_binds=window if binds else None, shape=shape)
        log.info("attention %s: %s", attention, why)
        if cfg.fp8_backward:
            check_fp8(device_kind)
        head, why = resolve_lm_head(cfg.lm_head, device_kind, self.liger, self.reason)
        log.info("lm head %s: %s", head, why)
        return dataclasses.replace(cfg, attn_implementation=attention, lm_head=head)

    def load(self, cfg, model_path: str, device):
        return load_hf(cfg, model_path, device)


# What unsloth does whatever the config says; a config asking otherwise is warned about, key by key.
UNSLOTH_FIXED = {"target_modules": "all-linear", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                 "fused_lora": True, "fp32_norms_and_embeddings": False, "attn_implementation": "auto", "bf16": "auto",
                 "fp8_backward": False, "lm_head": "trl"}
UNSLOTH_ANY = ("auto",)  # a key left at auto asks for nothing unsloth would ignore


@dataclass(frozen=True)
class UnslothBackend:
    """unsloth's fused QLoRA kernels: its own attention, chunked loss and checkpointing; one GPU."""

    reason: str
    name: ClassVar[str] = "unsloth"
    label: ClassVar[str] = "unsloth"
    multi_gpu: ClassVar[bool] = False  # open-source unsloth is single-GPU
    fused_loss: ClassVar[bool] = True

    def configure(self, cfg, device_kind: str, shape: AttentionShape = AttentionShape()):
        for key, fixed in UNSLOTH_FIXED.items():
            if getattr(cfg, key) != fixed and getattr(cfg, key) not in UNSLOTH_ANY:
                log.warning("backend unsloth ignores %s=%s (it uses %s); --set backend=auto honours it",
                            key, getattr(cfg, key), fixed)
        cfg = dataclasses.replace(cfg, lm_head="trl", fp8_backward=False)  # the trainer and loader read these
        if not cfg.packing:
            return cfg
        log.info("packing off: backend unsloth cannot keep packed samples apart (one sample per row instead)")
        return dataclasses.replace(cfg, packing=False)

    def load(self, cfg, model_path: str, device):
        model = load_unsloth(model_path, cfg.max_seq_length, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                             cfg.gradient_checkpointing, cfg.seed)
        log.info("model %s: unsloth 4-bit NF4, LoRA r=%d on %s", model_path, cfg.lora_r, ", ".join(LORA_TARGETS))
        return model


def resolve_lm_head(requested: str, device_kind: str, liger_applied: bool, liger_reason: str = "") -> tuple[str, str]:
    """The LM head training runs (training/lm_head.py), and why. auto: Liger's fused cross-entropy on the labelled
    positions where Liger is applied on CUDA (two vocabulary products per labelled token; +6% on full 2B rows on an
    H100, no slowdown seen on chat data), else TRL's fused head. liger by name without Liger applied on CUDA is
    refused."""
    if requested == "trl":
        return "trl", "TRL's fused head, by name"
    if device_kind == "cuda" and liger_applied:
        by_name = ", by name" if requested == "liger" else ""
        return "liger", f"Liger's fused cross-entropy on the labelled positions{by_name}"
    if requested == "liger" and device_kind == "cuda":
        raise BackendError("lm_head=liger needs Liger's fused cross-entropy, which is not applied here "
                           f"({liger_reason}); install liger-kernel (the gpu extra) or drop --set lm_head=liger")
    if requested == "liger":  # the CPU: the same positions through transformers' own loss (exact; the tests' path)
        return "liger", "the labelled positions through transformers' loss (Liger does not run on the CPU)"
    return "trl", "TRL's fused head " + ("(Liger not applied)" if device_kind == "cuda" else "(the CPU)")


Backend = Union[HFBackend, UnslothBackend]
MULTI_GPU = {"auto": HFBackend.multi_gpu, "hf": HFBackend.multi_gpu, "unsloth": UnslothBackend.multi_gpu}


def select_backend(requested: str, device_kind: str, model_type: str, processes: int = 1) -> Backend:
    """The backend this run trains with, chosen and applied (before any model code is imported: unsloth patches it
    on import, Liger patches its classes)."""
    if processes > 1 and not MULTI_GPU[requested]:
        raise BackendError(f"backend={requested} runs on one GPU only; with {processes} processes use "
                           "--set backend=auto, or train on one GPU (GPUS=1)")
    backend = apply_backend(choose_backend(requested, device_kind, model_type), model_type)
    log.info("backend %s: %s", backend.label, backend.reason)
    return backend


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_backend(requested: str, device_kind: str, model_type: str | None = None,
                   self_check=None) -> Backend:
    """Decide the backend before anything imports transformers' model code (unsloth patches it on import).
    `liger` here means "installed": `apply_backend` says whether the patch really took."""
    liger = device_kind == "cuda" and _installed("liger_kernel")
    if requested == "hf":
        return HFBackend(liger, "backend=hf asked for")
    if requested == "auto":
        return HFBackend(liger, "the project's path: transformers + peft" + (" + Liger" if liger else "")
                         + (", FlashAttention 4 or flex attention, fused LoRA" if device_kind == "cuda" else ""))
    if device_kind != "cuda":
        raise BackendError("backend=unsloth needs a CUDA GPU; use --set backend=auto (or hf) on the CPU")
    if model_type not in (None, "gemma2", "gemma", "llama", "mistral", "qwen2", "qwen3"):
        raise BackendError(f"unsloth is not used for model type '{model_type}': use --set backend=auto")
    if not _installed("unsloth"):
        raise BackendError("unsloth is not installed (pip install '.[fast]', or the GPU image built with "
                           "UNSLOTH=1): use --set backend=auto")
    ok, detail = (self_check or run_self_check)("unsloth")
    if ok:
        return UnslothBackend(f"unsloth passed its self-check ({detail})")
    raise BackendError(f"unsloth failed its self-check: {detail}. Use --set backend=auto")


def apply_backend(choice: Backend, model_type: str) -> Backend:
    """Apply what the choice needs before the model is built (Liger patches transformers' classes) and return what
    was really applied: the planner sizes the batch from this, not from what was hoped for."""
    if choice.name != "hf" or not choice.liger:
        return choice
    if apply_liger(model_type):
        return choice
    return dataclasses.replace(choice, liger=False, reason=choice.reason.replace(" + Liger", "") +
                               f" (Liger kernels not applied to '{model_type}': planned as materialised logits)")


# Liger's RoPE, kept on its Triton kernel on NVIDIA sm_90+. There Liger 0.8 dispatches RoPE to a CuTe DSL kernel
# (for Gemma-2's shapes and larger) whenever nvidia-cutlass-dsl is installed, which FlashAttention 4 brings: the GPU
# image has it. On one H100, in one call, packed chat rows, whose length changes every micro-batch, ran 0.59x with
# it (19,304 against 32,877 tokens/s), and full rows the same either way (docs/benchmarks.md, 2026-12-06, seventh
# lease); a fresh chat step's profile put 0.78 s of host time in the CuTe RoPE (fifth lease). Liger's other kernels on
# the recipe's path (norms, GeGLU/SwiGLU, the fused linear cross-entropy) call Triton's directly. An RTX 4090 (sm_89)
# has Triton's only.
LIGER_TRITON_OPS = ("rope",)
LIGER_GLOBAL_ENV = ("LIGER_KERNEL_IMPL", "LIGER_KERNEL_BACKEND")  # a user's choice for every op (BACKEND: legacy)


def pin_liger_triton(capability: tuple[int, int], environ=None) -> list[str]:
    """Set LIGER_KERNEL_IMPL_<OP>=nvidia-triton (Liger reads it at each call, before its own global setting and
    `set_impl`) for each op in LIGER_TRITON_OPS on an sm_90+ card, unless the user chose an implementation for that
    op or for all; returns the ops pinned here."""
    environ = os.environ if environ is None else environ
    if tuple(capability) < (9, 0) or any(environ.get(k) for k in LIGER_GLOBAL_ENV):
        return []
    pinned = [op for op in LIGER_TRITON_OPS if not any(environ.get(f"{k}_{op.upper()}") for k in LIGER_GLOBAL_ENV)]
    for op in pinned:
        environ[f"LIGER_KERNEL_IMPL_{op.upper()}"] = "nvidia-triton"
    return pinned


class _QuietLigerDiscovery(logging.Filter):
    """Liger 0.8 imports every implementation of an op it knows on first use and warns for each one that cannot
    import on this machine. On every NVIDIA run that includes Huawei's Ascend RoPE ("cannot import name 'tanh' from
    'triton.language.math'"), which reads like an error though it can never run here. Those warnings, for other
    hardware's kernels only, are dropped (liger_kernel.backends.registry.get_discovery_failures() keeps them). A
    failure of a kernel that could run here (Triton's, CuTe DSL's) still shows: with LIGER_KERNEL_IMPL_<OP> set, it
    is the only place the cause is said."""

    OTHER_HARDWARE = ("._ascend.",)  # module paths of Liger's kernels for other accelerators

    def filter(self, record: logging.LogRecord) -> bool:
        failed = "could not be imported" in str(record.msg) and isinstance(record.args, tuple) and record.args
        return not (failed and any(part in str(record.args[0]) for part in self.OTHER_HARDWARE))


_LIGER_DISCOVERY_FILTER = _QuietLigerDiscovery()


def apply_liger(model_type: str) -> bool:
    """Patch transformers' model code with Liger kernels; True only when the fused linear cross-entropy (what the
    planner counts on: no materialised logits) was applied. Liger itself only logs for a model it has no kernels for.
    Where its CuTe DSL kernels could run (NVIDIA sm_90+, nvidia-cutlass-dsl installed), RoPE stays on Triton's
    (pin_liger_triton). Liger's warnings that other hardware's kernels cannot import are dropped
    (_QuietLigerDiscovery)."""
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
    logging.getLogger("liger_kernel.backends.registry").addFilter(_LIGER_DISCOVERY_FILTER)  # added once
    import torch

    from training.distributed import local_rank

    if torch.cuda.is_available() and torch.version.hip is None and _installed("cutlass"):
        pinned = pin_liger_triton(torch.cuda.get_device_capability(local_rank()))
        if pinned:
            log.info("Liger: %s on its Triton kernel, not its CuTe DSL one (packed chat rows ran ~0.6x with that on "
                     "an H100); LIGER_KERNEL_IMPL_<OP> chooses", ", ".join(pinned))
    return True


# ------------------------------------------------------------------------------------------------ self-check

def _self_check_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-stack" / "backend_self_check.json"


def _self_check_key(backend: str, shape: AttentionShape = AttentionShape()) -> str:
    """Same check (and kernel variant), backend version (and what compiles it), torch, and GPU: same verdict."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = []
    for package in SELF_CHECK_PACKAGES.get(backend, (backend,)):
        try:
            versions.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package}=missing")
    variant = f" ({shape.variant})" if backend in ATTENTION_SELF_CHECKS else ""
    return (f"{backend}{variant} check v{SELF_CHECK_VERSION} {' '.join(versions)} torch={torch.__version__} "
            f"gpu={torch.cuda.get_device_name(0)}")


def run_self_check(backend: str, shape: AttentionShape = AttentionShape()) -> tuple[bool, str]:
    """One QLoRA step of `backend` on a small random Gemma-2 in a subprocess; (passed, detail). An attention check's
    model has the run's attention `shape`. A pass is cached per (check, kernel variant, versions, GPU); a failure is
    retried next time."""
    cache, key = _self_check_cache(), _self_check_key(backend, shape)
    try:
        cached = json.loads(cache.read_text()).get(key)
    except (OSError, ValueError):
        cached = None
    if cached:
        return True, cached + " (cached)"
    ok, detail = _run_self_check_subprocess(backend, shape)
    if ok:  # atomically: under GPUS=N every rank checks its own card and writes its pass here at about the same time
        try:
            old = json.loads(cache.read_text()) if cache.is_file() else {}
            write_json_atomic(cache, {**old, key: detail})
        except (OSError, ValueError):
            pass
    return ok, detail


def self_check_command(backend: str, shape: AttentionShape = AttentionShape()) -> list[str]:
    """The self-check's command line; an attention check carries the kernel variant (`main` parses it back)."""
    cmd = [sys.executable, "-m", "training.backends", "self-check", "--backend", backend, "--json"]
    if backend in ATTENTION_SELF_CHECKS:
        cmd += ["--head-dim", str(shape.head_dim), "--group", str(shape.group), "--softcap", str(shape.softcap or 0)]
    return cmd


def _run_self_check_subprocess(backend: str, shape: AttentionShape = AttentionShape()) -> tuple[bool, str]:
    cmd = self_check_command(backend, shape)
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
    if not result:  # it crashed: its last words say why
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"exit {proc.returncode}: {tail[0][:300]}"
    if result["ok"] and proc.returncode != 0:  # passed, then crashed (at teardown, say): not a pass
        return False, f"exit {proc.returncode} after: {result['detail']}"
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


def self_check_step(backend: str, shape: AttentionShape = AttentionShape()) -> dict:
    """unsloth: one forward/backward step; a finite loss near ln(vocab) (random init) and finite, non-zero LoRA
    gradients. flex, fa4, fa4-window: that attention against eager attention on a small Gemma-2 with the run's
    attention `shape` (head size, grouping, soft-cap; Gemma-2's by default), a sliding window and three packed
    samples: same loss and input gradients (within bf16 noise)."""
    import torch

    if backend in ATTENTION_SELF_CHECKS:
        return _attention_self_check(*ATTENTION_SELF_CHECKS[backend], shape=shape)
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


# self-check name -> (transformers' attn_implementation, the mini model's sliding window); the package whose version
# keys the cached verdict. Samples are up to 256 tokens. flex is checked with a window that binds (64 tokens). FA4 is
# checked with the kernel the run will use: "fa4" with a window no sample outgrows (256), dropped as load_hf drops it
# (its plain causal kernel: Gemma-2 at 2048 tokens), "fa4-window" with one that binds (64: its windowed kernel, for
# samples longer than the model's window). Both passed on an H100 (docs/benchmarks.md, 2026-12-06, fourth lease).
ATTENTION_SELF_CHECKS = {"flex": ("flex_attention", 64), "fa4": ("flash_attention_4", 256),
                         "fa4-window": ("flash_attention_4", 64)}
# trl: its collator decides what the attention is handed (the samples' boundaries from trl 1.16); transformers
# builds the masks and calls the kernels
_FA4_PACKAGES = ("flash-attn-4", "nvidia-cutlass-dsl", "transformers", "trl")
SELF_CHECK_PACKAGES = {"unsloth": ("unsloth",), "flex": ("torch", "transformers", "trl"),
                       "fa4": _FA4_PACKAGES, "fa4-window": _FA4_PACKAGES}
SELF_CHECK_VERSION = 5  # bump when a check changes: a cached pass of the old one no longer counts


def _attention_self_check(impl: str, sliding_window: int, device: str = "cuda", heads: tuple[int, int] | None = None,
                          boundaries: bool = True, shape: AttentionShape = AttentionShape()) -> dict:
    """Builds (flex: compiles, fa4: JIT-compiles) the attention's forward and backward kernels for the run's head
    size, grouping and soft-cap (`shape`, by default Gemma-2's: head_dim 256, 2 heads per kv head, soft-cap 50) on
    this card (a 24 GB card's shared memory can be too small for them) and checks them against eager attention on
    one packed row of three samples, collated as the recipe's trainer collates it (training.data.collate_packed, so
    the attention gets what training hands it). It catches masks, windows and samples attending across their
    boundaries (input gradients ~40-100% off on the CPU: tests), not the soft-cap: at random init the scores are
    ~0.1, where the soft-cap is the identity, and scaled into its range bf16 eager itself drifts as far as a missing
    soft-cap would (CPU: input gradients 0.52 off an fp32 reference at q, k x16, against 3.26 without the soft-cap).
    The soft-cap is checked at the kernel level instead, on the card: scripts/device/explore_fa4.py, FA4 and flex
    against an fp32 reference with scores in its range. `boundaries=False` drops the collator's sample boundaries
    (trl < 1.16 hands the model position_ids only); `heads`: explore_fa4.py's variants. The mini model's two layers
    are one sliding-window layer and one global layer, so a window that binds checks both of FA4's kernels."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from training.data import collate_packed, without_boundaries

    heads = heads or (shape.group, 1)
    # Gemma-2's layers with the run's attention: only what the kernel is built for matters here (the scores' scale
    # 1/sqrt(head_dim), as most models use; the soft-cap where the model has one)
    hidden = 256 if 256 % heads[0] == 0 else 128 * heads[0]  # 256 (the check before it carried shapes) where it divides
    cfg = Gemma2Config(vocab_size=512, hidden_size=hidden, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=shape.head_dim,
                       query_pre_attn_scalar=shape.head_dim, attn_logit_softcapping=shape.softcap,
                       sliding_window=sliding_window,
                       max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).train()
    # As load_hf does, and not for speed: with a KV cache, transformers builds no per-sample mask from position_ids,
    # and eager (and flex) attend across the packed samples. Until v5 this check compared against that reference,
    # and failed FA4, which kept the samples apart (its loss and input gradients on the H100 are those of a
    # per-sample causal attention computed on the CPU: docs/benchmarks.md, 2026-12-06, third lease).
    model.config.use_cache = False
    ids = torch.randint(3, 512, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths = (100, 156, 256)
    # one packed row of three samples, collated as the recipe's trainer does (with the installed trl's boundaries)
    batch = collate_packed([{"input_ids": ids, "labels": ids, "seq_lengths": list(lengths)}])
    if not boundaries:
        batch = without_boundaries(batch)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    input_ids = batch.pop("input_ids")
    results = {}
    for name in ("eager", impl):
        model.set_attn_implementation(name)
        if name == "flash_attention_4":  # as load_hf does: a window no sample outgrows is dropped, one that binds kept
            drop_unbinding_window(model, max(lengths))
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(inputs_embeds=embeds, **batch).loss
        loss.backward()
        results[name] = (float(loss.detach()), embeds.grad.float())
    (le, ge), (lx, gx) = results["eager"], results[impl]
    grad_err = float((ge - gx).norm() / ge.norm().clamp_min(1e-12))
    ok = math.isfinite(lx) and abs(lx - le) <= 2e-3 * abs(le) and grad_err < 0.05
    return {"ok": ok, "detail": f"{impl} loss {lx:.4f} vs eager {le:.4f}, input-gradient error {grad_err:.2e} "
                                f"({shape.variant})",
            "loss": lx}


def fa4_unusable(device_kind: str) -> str | None:
    """Why FlashAttention 4 (flash-attn-4, the CuTe DSL kernels) cannot train here, or None. Its backward runs on
    Hopper and datacenter Blackwell (compute capability 9.x, 10.x, 11.x); consumer Blackwell (12.x) has no soft-cap
    backward, Ada and Ampere (an RTX 4090, an A100) none at all. The card first, then the install: the reason given
    is one the user can act on."""
    if device_kind != "cuda":
        return "no CUDA GPU"
    import torch

    from training.distributed import local_rank

    major, minor = torch.cuda.get_device_capability(local_rank())
    if major not in (9, 10, 11):
        return (f"{torch.cuda.get_device_name(local_rank())} (compute capability {major}.{minor}): FlashAttention 4 "
                "trains on Hopper and datacenter Blackwell only (9.x, 10.x, 11.x)")
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("flash-attn-4")
    except PackageNotFoundError:
        return "flash-attn-4 is not installed (the fa4 extra and the GPU image install it)"
    return None


def drop_unbinding_window(model, max_seq_length: int) -> int:
    """For FlashAttention 4: the attention layers' sliding window, where no sample (at most max_seq_length tokens,
    packed rows kept apart by their sequence boundaries) can outgrow it, so that FA4 runs its plain causal kernel,
    the one its "fa4" self-check checks and the one measured (docs/benchmarks.md), instead of its windowed one. The
    same attention either way. A window that can bind is kept (the "fa4-window" check). Returns how many layers had
    their window dropped."""
    dropped = 0
    for module in model.modules():
        window = getattr(module, "sliding_window", None)
        if isinstance(window, int) and hasattr(module, "q_proj") and max_seq_length <= window:
            module.sliding_window = None
            dropped += 1
    return dropped


def use_fa4_kernel_cache() -> None:
    """FA4 compiles its kernels when first called (seconds to a minute each): keep them on disk beside the
    self-check verdicts, so that the self-check's compilation serves the run, and one run the next (the variables
    are read when flash_attn.cute is imported; the self-check's subprocess inherits them)."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(_self_check_cache().parent / "fa4-kernels"))


def resolve_attention(requested: str, device_kind: str, self_check=None,
                      window_binds: int | None = None, shape: AttentionShape = AttentionShape()) -> tuple[str, str]:
    """`auto` on CUDA: FlashAttention 4 where it can train (Hopper, datacenter Blackwell, flash-attn-4 installed) once
    its self-check passed on this card, else flex attention once its self-check passed, else eager; on the CPU eager.
    All keep Gemma-2's soft-cap and are exact for packed rows; FA4 and flex never materialise the S x S scores. Passes
    are cached (a failure is checked again next run). On an H100 the recipe with FA4 ran full rows 1.59x unsloth's
    best setting, the default path with flex 1.39x (docs/benchmarks.md, 2026-12-07, second lease).
    FA4 or flex asked for by name on CUDA runs the same self-check, and a failure is refused: training on wrong
    attention loses the run. `window_binds`: the model's sliding window where a sample can be longer than it; FA4 is
    then checked with its windowed kernel ("fa4-window"), else with its plain causal one, the window dropped (load_hf:
    drop_unbinding_window). `shape`: the base model's attention, which the checks are built with."""
    check = self_check or functools.partial(run_self_check, shape=shape)
    fa4_check = "fa4-window" if window_binds else "fa4"
    # a failed windowed kernel's fix: samples the window cannot outgrow run the plain kernel, a check of its own
    shorter = (f"; or --set max_seq_length={window_binds} (<= the model's sliding window), which runs FA4's plain "
               "kernel" if window_binds else "")
    if requested == "flash_attention_4":
        why_not = fa4_unusable(device_kind)
        if why_not:
            raise BackendError(f"attn_implementation=flash_attention_4 cannot train here: {why_not}; use "
                               "--set attn_implementation=auto (flex attention on this card)")
        use_fa4_kernel_cache()
    if requested in ("flash_attention_4", "flex_attention") and device_kind == "cuda":
        name = fa4_check if requested == "flash_attention_4" else "flex"
        ok, detail = check(name)
        if not ok:
            raise BackendError(f"attn_implementation={requested} failed its self-check ({name}) on this card "
                               f"({detail}): it would train on wrong attention; use --set attn_implementation=auto, "
                               "which falls back to an attention that passes"
                               + (shorter if requested == "flash_attention_4" else ""))
        return requested, f"attn_implementation={requested} asked for; it passed its self-check ({name}: {detail})"
    if requested != "auto":
        return requested, f"attn_implementation={requested} asked for"
    if device_kind != "cuda":
        return "eager", "CPU: eager attention (compiling flex attention for the CPU takes minutes)"
    why_not = fa4_unusable(device_kind)
    if why_not is None:
        use_fa4_kernel_cache()
        ok, detail = check(fa4_check)
        if ok:
            return "flash_attention_4", f"FlashAttention 4 passed its self-check ({fa4_check}: {detail})"
        log.warning("FlashAttention 4 could train on this card but failed its self-check (%s: %s): flex attention "
                    "instead, slower; the check runs again next time%s", fa4_check, detail, shorter)
        why_not = f"its self-check failed ({fa4_check}: {detail})"
    ok, detail = check("flex")
    if ok:
        return "flex_attention", f"flex attention passed its self-check ({detail}); not FlashAttention 4: {why_not}"
    return "eager", (f"flex attention failed its self-check ({detail}); eager attention instead (exact, slower); "
                     f"not FlashAttention 4: {why_not}")


# ------------------------------------------------------------------------------------------------ loading

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


def load_hf(cfg, model_path: str, device):
    """Base weights in 4-bit NF4 (+ double quant) with LoRA on all linear layers, through transformers + peft (Liger's
    kernels, when apply_backend applied them, are already patched into transformers' classes). The Trainer is told
    not to checkpoint: this sets checkpointing up, per layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from training.distributed import fsdp_enabled, local_rank
    from training.fast_lora import apply_fused_lora
    from training.model import ModelLoadError, explain_load_error

    fsdp = fsdp_enabled()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=device.compute_dtype,
        # FSDP shards parameters of one float dtype: store the packed 4-bit weights as the compute dtype (bf16) so
        # they can be flattened and sharded with the LoRA weights (the bitsandbytes FSDP-QLoRA recipe).
        **({"bnb_4bit_quant_storage": device.compute_dtype} if fsdp else {}),
    )
    # Each rank (GPUS=N) loads the 4-bit base onto its own card; under FSDP transformers places it itself
    # (rank 0 reads the weights, the others wait for FSDP to hand them their shard: fsdp_cpu_ram_efficient_loading).
    device_map = None if fsdp and device.kind == "cuda" else {"": local_rank() if device.kind == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            quantization_config=quant,
            dtype=device.compute_dtype,
            attn_implementation="eager" if cfg.attn_implementation == "auto" else cfg.attn_implementation,
            device_map=device_map,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(explain_load_error(model_path, exc)) from None
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if cfg.attn_implementation == "flash_attention_4":
        drop_unbinding_window(model, cfg.max_seq_length)
    prepare_for_kbit_training(model, cfg.fp32_norms_and_embeddings)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.fp8_backward and device.kind == "cuda" and device.compute_dtype != torch.bfloat16:
        raise BackendError("fp8_backward needs bf16 compute (FP8 matmuls with per-row scales return bf16); this run "
                           "computes in fp16 (bf16=false or a card without bf16): drop --set fp8_backward=true")
    # Under FSDP the Trainer wraps each LoRA A and B as a unit of its own (peft's wrap policy), gathered only when the
    # module itself is called: the fused function reads their weights without calling them, so peft's forward runs.
    fused, groups, mlps = (apply_fused_lora(model, fp8="backward" if cfg.fp8_backward else "")
                           if cfg.fused_lora and not fsdp else (0, 0, 0))
    if cfg.fused_lora and fsdp:
        log.info("fused LoRA: off under FSDP (each LoRA weight is gathered only when its own module runs)")
    recomputed = enable_checkpointing(model, cfg.recompute_layers) if cfg.gradient_checkpointing else 0
    trainable, total = model.get_nb_trainable_parameters()
    log.info("model %s: 4-bit %s%s, LoRA r=%d on %s: %s trainable of %s parameters (%.2f%%); %s attention, "
             "fused LoRA on %d layers (%d groups reading one input, %d MLPs that recompute their activation)%s, %s "
             "norms/embeddings, %d layers recomputed",
             model_path, cfg.bnb_4bit_quant_type, " + double quant" if cfg.bnb_4bit_use_double_quant else "",
             cfg.lora_r, cfg.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
             model.config._attn_implementation, fused, groups, mlps,
             " (input gradients in FP8)" if cfg.fp8_backward else "",
             "fp32" if cfg.fp32_norms_and_embeddings else "compute-dtype",
             recomputed)
    return model


def check_fp8(device_kind: str) -> None:
    """fp8_backward needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper and newer); on the CPU it is emulated."""
    import torch

    from training.distributed import local_rank
    from training.fast_lora import fp8_supported

    capability = torch.cuda.get_device_capability(local_rank()) if device_kind == "cuda" else None
    if not fp8_supported(capability):
        raise BackendError(f"fp8_backward: {torch.cuda.get_device_name(local_rank())} (compute capability "
                           f"{capability[0]}.{capability[1]}) has no FP8 tensor cores (they start at 8.9: RTX 40xx/Ada, "
                           "H100/Hopper); drop --set fp8_backward=true")
    if capability is None:
        log.warning("fp8_backward on the CPU: FP8 matmuls are emulated (same numerics, no speed-up)")
        return
    from training.fast_lora import fp8_matmul

    card = torch.device("cuda", local_rank())  # this process's card: no CUDA context on another rank's
    a = torch.randn(64, 256, device=card, dtype=torch.bfloat16)
    b = torch.randn(128, 256, device=card, dtype=torch.bfloat16)
    try:  # per-row scales need cuBLAS 12.9+ or torch's own kernel for this card: try it once, small
        err = float((fp8_matmul(a, b, torch.bfloat16).float() - (a @ b.t()).float()).norm() / (a @ b.t()).float().norm())
    except (RuntimeError, NotImplementedError) as exc:
        raise BackendError(f"fp8_backward: this card and torch {torch.__version__} cannot run FP8 matmuls with "
                           f"per-row scales ({str(exc).splitlines()[0]}); drop --set fp8_backward=true") from None
    if not err < 0.05:
        raise BackendError(f"fp8_backward: an FP8 matmul on this card is off by {err:.1%} (expected under 5%); "
                           "drop --set fp8_backward=true")


def prepare_for_kbit_training(model, fp32_frozen: bool) -> None:
    """peft's prepare_model_for_kbit_training without its upcast unless asked: every base weight frozen; frozen norms
    and embeddings stay in the compute dtype (as the model was trained) instead of fp32, which would make the whole
    residual stream fp32 (~1.4x slower steps on an H200, +2.2 GiB on Gemma-2-2B). Inputs require grad so that
    checkpointed layers get gradients."""
    if fp32_frozen:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()


def enable_checkpointing(model, recompute_layers: int) -> int:
    """Non-reentrant gradient checkpointing on the first `recompute_layers` decoder layers (-1: all); the others keep
    their activations. Returns how many layers recompute."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    keep_from = len(layers) if recompute_layers < 0 else min(recompute_layers, len(layers))
    for layer in layers[keep_from:]:
        layer.gradient_checkpointing = False
    return keep_from


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.backends", description="Backend self-check.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("self-check", help="one training step of a backend on a small random Gemma-2")
    c.add_argument("--backend", default="unsloth", choices=("unsloth", *ATTENTION_SELF_CHECKS))
    c.add_argument("--json", action="store_true")
    defaults = AttentionShape()  # an attention check's kernel variant (the run's: self_check_command)
    c.add_argument("--head-dim", type=int, default=defaults.head_dim)
    c.add_argument("--group", type=int, default=defaults.group, help="query heads per key/value head")
    c.add_argument("--softcap", type=float, default=defaults.softcap, help="attention logit soft-cap; 0: none")
    args = p.parse_args(argv)
    shape = AttentionShape(head_dim=args.head_dim, group=args.group, softcap=args.softcap or None)
    import torch

    if not torch.cuda.is_available():
        result = {"ok": False, "detail": "no CUDA GPU visible"}
    else:
        from training.distributed import local_rank

        torch.cuda.set_device(local_rank())  # under DDP each rank checks its own card (LOCAL_RANK is inherited)
        try:
            result = self_check_step(args.backend, shape)
        except Exception as exc:  # the point of the self-check: any failure means "do not use it"
            result = {"ok": False, "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    print(json.dumps(result) if args.json else f"{'PASS' if result['ok'] else 'FAIL'}: {result['detail']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
