"""VRAM planner: predict the peak GPU memory of a QLoRA step from the model's config (no weights), and pick the
micro-batch and gradient checkpointing that fit a card while keeping the tokens per optimizer step.

    python -m training.plan --preset gemma-2b --gpu-mem 24 [--backend hf|unsloth] [--json]

The model is arithmetic on the architecture, with per-token constants fitted to measurements on an H100 (the
seed's fp32-upcast path) and an H200 (the project's bf16 path, flex attention) (docs/benchmarks.md;
`scripts/benchmark.py` re-measures them and prints predicted vs measured). Checkpointing is chosen per layer: the
largest micro-batch that fits with every layer recomputed, then as many layers kept (not recomputed) as still fit,
since with a frozen base recompute is about a third of a step's work. Peak here means
`torch.cuda.max_memory_allocated()`; the CUDA context and allocator slack come on top, which is why a plan keeps
headroom (HEADROOM_GIB + HEADROOM_FRACTION of the card).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from training.errors import UserError
from training.qlora_config import eight_bit_moments

GIB = 2**30
HEADROOM_GIB = 1.5  # CUDA context, cuBLAS workspace, allocator fragmentation
HEADROOM_FRACTION = 0.08  # and a share of the card for what grows with it (caching allocator blocks)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)

# Per-token constants in bytes, fitted to H100 measurements (bf16 compute, NF4 + double quant, LoRA all-linear).
NF4_BYTES_PER_PARAM = 0.516  # 4 bits + double-quantised absmax (blocksize 64)
LORA_BYTES_PER_PARAM = 10.0  # fp32 weight (4) + fp32 grad (4) + 8-bit Adam moments (2)
LORA_BYTES_PER_PARAM_32BIT_OPTIM = 16.0  # the same with 32-bit moments (8): adamw_torch(_fused), paged_adamw_32bit
CKPT_HIDDEN_BYTES = 4.0  # per layer per hidden unit: checkpointed layer inputs (fp32 residual after kbit prep)
LAYER_WORKSET_BYTES = 40.0  # per intermediate unit: one layer's activations live during recompute + backward
NO_CKPT_LAYER_BYTES = 142.0  # per layer per hidden unit when every activation is kept (no checkpointing)
EAGER_ATTN_BYTES = 10.0  # per score: fp32 scores, tanh soft-cap, softmax, bf16 copy of one layer's S x S maps
LOGIT_BYTES = 18.6  # per vocabulary entry per token when logits are materialised (bf16 + fp32 upcasts + grad)
UNSLOTH_TOKEN_BYTES = 2.0  # per layer per hidden unit: unsloth offloads checkpoints to host RAM, keeps bf16 copies
UNSLOTH_EXTRA_TOKEN_BYTES = 35.0  # per hidden unit: unsloth's fused kernels' working set
UNSLOTH_NO_CKPT_LAYER_BYTES = 64.0  # per layer per hidden unit, unsloth without checkpointing (H200: 32/61/120 GiB)
# The project's path keeps norms and embeddings in bf16 (no fp32 upcast): fitted on the H200, 2B shape, flex attention.
# Its peak is the larger of two moments: the start of the backward (every kept layer's activations plus every
# recomputed layer's input) and the recompute of one checkpointed layer (its activations and their gradients; the
# kept layers, the last ones, are already freed by then). So the first few kept layers cost nothing.
BF16_CKPT_HIDDEN_BYTES = 2.0  # per layer per hidden unit: a recomputed layer keeps only its bf16 input
BF16_LAYER_BYTES = 42.0  # per layer per hidden unit: a layer that keeps its activations (mb 8 -> 16: +38.4 GiB)
BF16_RECOMPUTE_BYTES = 102.0  # per hidden unit: one layer being recomputed, activations and gradients (12.25 GiB)
BF16_BACKWARD_START_BYTES = 10.0  # per hidden unit: what the first backward step adds when kept layers set the peak
# (H200, 16 x 2048, 5 of 26 layers kept: 20.90 GiB measured where the two constants above alone gave 20.18)
EAGER_SCORE_BYTES_BF16 = 8.4  # per score per layer with scores kept: eager attention's S x S maps (bf16 path)
# The constants above were fitted with the MLP's gated activation kept (act(gate) * up, bf16). The fused LoRA path
# recomputes it in the backward instead (training/fast_lora.py: LoRA4bitGatedDown), for the MLPs it knows:
GATED_ACT_BYTES = 2.0  # per layer per intermediate unit: the kept product that the fused path drops


@dataclass(frozen=True)
class Arch:
    """What the planner needs from a model config."""

    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    model_type: str = ""  # config.json's, and its MLP's activation: whether the fused path recomputes it (fast_lora)
    activation: str = ""

    @classmethod
    def from_config(cls, cfg) -> "Arch":
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        heads = get("num_attention_heads")
        return cls(get("num_hidden_layers"), get("hidden_size"), get("intermediate_size"), get("vocab_size"),
                   heads, get("num_key_value_heads") or heads, get("head_dim") or get("hidden_size") // heads,
                   get("model_type") or "", get("hidden_activation") or get("hidden_act") or "")

    def linear_params(self) -> int:
        attn = self.hidden * self.head_dim * (self.heads + 2 * self.kv_heads) + self.heads * self.head_dim * self.hidden
        return self.num_layers * (attn + 3 * self.hidden * self.intermediate)

    def lora_params(self, r: int) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = r * ((h + q) * 2 + (h + kv) * 2 + (h + self.intermediate) * 3)
        return self.num_layers * per_layer


# Architectures of the presets' base models (from their config.json), so planning needs no download.
KNOWN_ARCHS = {
    "google/gemma-2-2b": Arch(26, 2304, 9216, 256000, 8, 4, 256, "gemma2", "gelu_pytorch_tanh"),
    "google/gemma-2-9b": Arch(42, 3584, 14336, 256000, 16, 8, 256, "gemma2", "gelu_pytorch_tanh"),
    "google/gemma-2-27b": Arch(46, 4608, 36864, 256000, 32, 16, 128, "gemma2", "gelu_pytorch_tanh"),
}


@dataclass(frozen=True)
class Estimate:
    micro_batch: int
    gradient_checkpointing: bool
    weights_gib: float
    lora_gib: float
    activations_gib: float
    logits_gib: float
    peak_gib: float
    recompute_layers: int = 0  # checkpointed layers (recomputed in backward)


def estimate_peak(arch: Arch, micro_batch: int, seq_len: int, lora_r: int, backend: str = "hf",
                  gradient_checkpointing: bool = True, fused_loss: bool = True, eager_attention: bool = True,
                  fp32_embeddings: bool = True, recompute_layers: int | None = None,
                  optim: str = "adamw_8bit", recompute_act: bool = False) -> Estimate:
    """Peak allocated bytes of one training step. backend: 'hf' (transformers + peft, optional fused loss from
    Liger) or 'unsloth'. fp32_embeddings: peft's prepare_model_for_kbit_training upcast (the seed's path; its
    residual stream is fp32), else the project's bf16 path. recompute_layers: how many layers are checkpointed
    (None: all of them when gradient_checkpointing, none otherwise). optim: the optimizer, whose moments are 8-bit
    (training.qlora_config.eight_bit_moments) or 32-bit. recompute_act: the fused path recomputes the MLP's gated
    activation instead of keeping it (bf16 path; training.fast_lora.recomputes_activation)."""
    tokens = micro_batch * seq_len
    L = arch.num_layers
    recomputed = (L if gradient_checkpointing else 0) if recompute_layers is None else max(0, min(L, recompute_layers))
    embed_bytes = arch.vocab * arch.hidden * (4 if fp32_embeddings and backend == "hf" else 2)
    weights = arch.linear_params() * NF4_BYTES_PER_PARAM + embed_bytes
    lora = arch.lora_params(lora_r) * (LORA_BYTES_PER_PARAM if eight_bit_moments(optim) else
                                       LORA_BYTES_PER_PARAM_32BIT_OPTIM)
    scores = micro_batch * arch.heads * seq_len * seq_len
    if backend == "unsloth":
        if recomputed:
            acts = tokens * (L * arch.hidden * UNSLOTH_TOKEN_BYTES + arch.hidden * UNSLOTH_EXTRA_TOKEN_BYTES)
        else:
            acts = tokens * L * arch.hidden * UNSLOTH_NO_CKPT_LAYER_BYTES
        logits = 0.0  # fused, chunked cross-entropy
    elif fp32_embeddings:  # the seed's path, fitted on the H100
        if recomputed:
            acts = tokens * (L * arch.hidden * CKPT_HIDDEN_BYTES + arch.intermediate * LAYER_WORKSET_BYTES)
            layers_with_scores = 1
        else:
            acts = tokens * L * arch.hidden * NO_CKPT_LAYER_BYTES
            layers_with_scores = L
        if eager_attention:
            acts += scores * EAGER_ATTN_BYTES * layers_with_scores
        logits = 0.0 if fused_loss else tokens * arch.vocab * LOGIT_BYTES
    else:  # the project's bf16 path: the larger of the two moments above (first kept layers are free)
        kept, h = L - recomputed, arch.hidden
        dropped = arch.intermediate * GATED_ACT_BYTES if recompute_act else 0.0  # per layer, not kept
        start_of_backward = (recomputed * h * BF16_CKPT_HIDDEN_BYTES + kept * (h * BF16_LAYER_BYTES - dropped)
                             + h * BF16_BACKWARD_START_BYTES)
        during_recompute = (recomputed * h * BF16_CKPT_HIDDEN_BYTES + h * BF16_RECOMPUTE_BYTES - dropped
                            if recomputed else 0.0)
        acts = tokens * max(start_of_backward, during_recompute)
        if eager_attention:
            acts += scores * EAGER_SCORE_BYTES_BF16 * max(kept, 1 if recomputed else 0)
        logits = 0.0 if fused_loss else tokens * arch.vocab * LOGIT_BYTES
    total = weights + lora + acts + logits
    return Estimate(micro_batch, recomputed > 0, round(weights / GIB, 2), round(lora / GIB, 2),
                    round(acts / GIB, 2), round(logits / GIB, 2), round(total / GIB, 2), recomputed)


def budget_gib(gpu_mem_gib: float) -> float:
    return gpu_mem_gib * (1 - HEADROOM_FRACTION) - HEADROOM_GIB


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    predicted_peak_gib: float
    budget_gib: float
    gpu_mem_gib: float
    backend: str
    reason: str
    recompute_layers: int = 0  # of the model's layers, how many are checkpointed (0: none)

    def as_dict(self) -> dict:
        return asdict(self)


class PlanError(UserError, ValueError):
    """Nothing fits the card; the message says what would."""


def plan(arch: Arch, sequences_per_step: int, seq_len: int, lora_r: int, gpu_mem_gib: float, backend: str = "hf",
         fused_loss: bool = True, eager_attention: bool = True, max_micro_batch: int | None = None,
         allow_no_checkpointing: bool = True, fp32_embeddings: bool = True, optim: str = "adamw_8bit",
         recompute_act: bool = False) -> Plan:
    """Largest micro-batch (a divisor of sequences_per_step) that fits the budget with every layer checkpointed;
    then as few checkpointed layers as still fit (hf: per layer; unsloth: all or none), since recompute costs a
    third of a step; keeps sequences_per_step x seq_len tokens per step."""
    budget = budget_gib(gpu_mem_gib)
    cap = min(sequences_per_step, max_micro_batch or sequences_per_step)
    candidates = [b for b in MICRO_BATCHES if b <= cap and sequences_per_step % b == 0]
    kw = dict(fused_loss=fused_loss, eager_attention=eager_attention, fp32_embeddings=fp32_embeddings, optim=optim,
              recompute_act=recompute_act)
    best: Estimate | None = None
    for b in candidates:
        est = estimate_peak(arch, b, seq_len, lora_r, backend, True, **kw)
        if est.peak_gib <= budget:
            best = est
    if best is None:
        smallest = estimate_peak(arch, 1, seq_len, lora_r, backend, True, **kw)
        raise PlanError(f"even micro-batch 1 needs about {smallest.peak_gib:.1f} GiB at {seq_len} tokens "
                        f"(budget {budget:.1f} GiB of a {gpu_mem_gib:g} GiB card). Shorten sequences "
                        "(--set max_seq_length=1024), lower lora_r, or use a larger card")
    reason = "largest micro-batch that fits with gradient checkpointing"
    if allow_no_checkpointing:
        per_layer = backend == "hf" and not fp32_embeddings  # the seed's fp32 path: all or nothing, as fitted
        for recomputed in (range(0, arch.num_layers) if per_layer else (0,)):
            est = estimate_peak(arch, best.micro_batch, seq_len, lora_r, backend, recomputed > 0,
                                recompute_layers=recomputed, **kw)
            if est.peak_gib <= budget:
                best = est
                reason = ("fits without gradient checkpointing (faster)" if recomputed == 0 else
                          f"{arch.num_layers - recomputed} of {arch.num_layers} layers keep their activations "
                          "(not recomputed); the rest are checkpointed")
                break
    return Plan(best.micro_batch, sequences_per_step // best.micro_batch, best.gradient_checkpointing,
                best.peak_gib, round(budget, 2), gpu_mem_gib, backend, reason, best.recompute_layers)


def arch_for(model_name_or_path: str) -> Arch:
    """From the known table, or a local config.json, or the hub's config (a few KB, never weights)."""
    if model_name_or_path in KNOWN_ARCHS:
        return KNOWN_ARCHS[model_name_or_path]
    from transformers import AutoConfig

    from training.tiny import resolve_builtin

    return Arch.from_config(AutoConfig.from_pretrained(resolve_builtin(model_name_or_path)))


def recompute_act_for(cfg, backend: str, arch: Arch) -> bool:
    """Whether the run's fused LoRA recomputes the MLP's gated activation (training/fast_lora.py decides), which a
    plan then does not count: only on the project's path (hf), and not under FSDP (fused LoRA is off there)."""
    from training.distributed import fsdp_enabled
    from training.fast_lora import recomputes_activation

    return backend == "hf" and not fsdp_enabled() and recomputes_activation(arch.model_type, arch.activation, cfg)


def plan_for_run(cfg, device, backend) -> tuple:
    """On CUDA, let the planner choose micro-batch and per-layer checkpointing for the card, keeping the tokens per
    optimizer step of the config. `backend` is what was applied (training.backends: its `name` and `fused_loss`, so
    a Liger patch that did not take plans for materialised logits), cfg.attn_implementation the attention that will
    run. Returns the updated config and a log line."""
    from dataclasses import replace

    if device.kind != "cuda" or not cfg.plan_memory:
        return cfg, "planner off (CPU or plan_memory=false): micro-batch and checkpointing as configured"
    gpu_mem = cfg.gpu_mem_gib or device.memory_gib or 0.0
    sequences = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    arch = arch_for(cfg.model_name_or_path)  # known table, else the (builtin-resolved) config.json
    p = plan(arch, sequences, cfg.max_seq_length, cfg.lora_r, gpu_mem, backend.name,  # PlanError: nothing fits
             fused_loss=backend.fused_loss, eager_attention=cfg.attn_implementation in ("eager", "auto"),
             max_micro_batch=cfg.max_micro_batch, fp32_embeddings=cfg.fp32_norms_and_embeddings, optim=cfg.optim,
             recompute_act=recompute_act_for(cfg, backend.name, arch))
    new = replace(cfg, per_device_train_batch_size=p.micro_batch, gradient_accumulation_steps=p.gradient_accumulation_steps,
                  gradient_checkpointing=p.gradient_checkpointing, recompute_layers=p.recompute_layers)
    ckpt = f"on for {p.recompute_layers} of {arch.num_layers} layers" if p.gradient_checkpointing else "off"
    line = (f"planner ({gpu_mem:.0f} GiB card, {backend.label}, {cfg.attn_implementation} attention): micro-batch "
            f"{p.micro_batch} x accumulation {p.gradient_accumulation_steps}, gradient checkpointing {ckpt}, "
            f"predicted peak {p.predicted_peak_gib:.1f} GiB ({p.reason})")
    return new, line


def main(argv: list[str] | None = None) -> int:
    from training.qlora_config import CHOICES, PRESETS

    p = argparse.ArgumentParser(prog="python -m training.plan", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gemma-2b", choices=list(PRESETS))
    p.add_argument("--model", help="base model id or path (default: the preset's)")
    p.add_argument("--gpu-mem", type=float, required=True, help="card memory in GiB, e.g. 24 for an RTX 4090")
    p.add_argument("--backend", default="hf", choices=("hf", "unsloth"))
    p.add_argument("--seq-len", type=int, help="default: the preset's max_seq_length")
    p.add_argument("--no-fused-loss", action="store_true", help="logits materialised (no Liger / unsloth loss)")
    p.add_argument("--attention", choices=("flex", "eager"), default="flex",
                   help="flex: flex attention or FlashAttention 4 (no S x S scores; the same plan, measured within "
                        "1%% on an H100), the default on CUDA; eager: their fallback")
    p.add_argument("--fp32-embeddings", action="store_true", help="peft's fp32 upcast (the seed's path)")
    p.add_argument("--optim", choices=CHOICES["optim"],
                   help="the optimizer (default: the preset's); 32-bit ones (adamw_torch_fused) keep 6 more bytes per "
                        "LoRA parameter than *8bit ones")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    model = args.model or preset.model_name_or_path
    if not model:
        print("error: preset 'custom' needs --model ID_OR_PATH", file=sys.stderr)
        return 2
    seq = args.seq_len or preset.max_seq_length
    sequences = preset.per_device_train_batch_size * preset.gradient_accumulation_steps
    try:
        eager = args.attention == "eager" if preset.attn_implementation == "auto" else preset.attn_implementation == "eager"
        arch = arch_for(model)
        result = plan(arch, sequences, seq, preset.lora_r, args.gpu_mem, args.backend,
                      fused_loss=not args.no_fused_loss, eager_attention=eager,
                      fp32_embeddings=args.fp32_embeddings or preset.fp32_norms_and_embeddings,
                      optim=args.optim or preset.optim,
                      recompute_act=recompute_act_for(preset, args.backend, arch))
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(f"{args.preset} ({model}) on a {args.gpu_mem:g} GiB card, backend {args.backend}, {seq} tokens/sequence:")
    print(f"  micro-batch {result.micro_batch} x accumulation {result.gradient_accumulation_steps} "
          f"= {sequences} sequences per optimizer step; gradient checkpointing "
          f"{f'on for {result.recompute_layers} layers' if result.gradient_checkpointing else 'off'}")
    print(f"  predicted peak {result.predicted_peak_gib:.1f} GiB of a {result.budget_gib:.1f} GiB budget ({result.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
