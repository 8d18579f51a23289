"""The base model in 4-bit NF4 (QLoRA) with LoRA adapters on all linear layers, and the device it runs on.

CUDA when present (bf16 compute if the card has it, else fp16); otherwise the CPU with fp32 compute through
the same bitsandbytes 4-bit path. Resource checks run before anything large is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from training.qlora_config import QLoRAConfig
from training.errors import UserError

log = logging.getLogger("training")


class ResourceError(UserError, RuntimeError):
    """The machine cannot run this preset; the message says what is missing and what to do instead."""


class ModelLoadError(UserError, RuntimeError):
    """The base model or tokenizer cannot be loaded (missing path, gated repo, no network...)."""


# Up to ~400M parameters (SmolLM2-360M, Qwen2.5-0.5B without embeddings) a CPU step on short sequences takes
# seconds to minutes; the Gemma-2 2B/9B presets would take hours per step.
CPU_MAX_PARAMS = 400_000_000


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    memory_gib: float | None
    compute_dtype: torch.dtype
    bf16: bool
    fp16: bool

    def describe(self) -> str:
        mem = f", {self.memory_gib:.1f} GiB" if self.memory_gib else ""
        return f"{self.kind} ({self.name}{mem}), compute {str(self.compute_dtype).replace('torch.', '')}"


def pick_device(cfg: QLoRAConfig, preset: str) -> Device:
    """Choose the device and precision, and refuse presets the machine cannot run."""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise ResourceError("device=cuda was asked for but no CUDA GPU is visible. Check `nvidia-smi`, the NVIDIA "
                            "container runtime (make doctor), or use --set device=auto")
    if has_cuda and cfg.device != "cpu":
        props = torch.cuda.get_device_properties(0)
        mem = props.total_memory / 2**30
        if cfg.min_gpu_mem_gib and mem < cfg.min_gpu_mem_gib:
            raise ResourceError(f"preset '{preset}' needs a GPU with at least {cfg.min_gpu_mem_gib:g} GiB; "
                                f"{props.name} has {mem:.1f} GiB. Use a smaller preset (gemma-2b), a shorter "
                                "--set max_seq_length, or --set min_gpu_mem_gib=0 to try anyway")
        bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and torch.cuda.is_bf16_supported())
        return Device("cuda", props.name, mem, torch.bfloat16 if bf16 else torch.float16, bf16, not bf16)
    admit_cpu(cfg, preset)
    return Device("cpu", "CPU", None, torch.float32, False, False)


def admit_cpu(cfg: QLoRAConfig, preset: str) -> None:
    """Train on the CPU only a base model small enough for it (or with allow_cpu); refuse with the time per step."""
    from training.model_check import count_parameters

    if cfg.allow_cpu:
        log.info("no CUDA GPU: training on the CPU (allow_cpu=true)")
        return
    params = count_parameters(cfg.model_name_or_path)
    tokens = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.max_seq_length
    step_s = cpu_step_seconds(params, tokens)
    size = f"{cfg.model_name_or_path} has {params / 1e6:,.{0 if params >= 1e7 else 1}f}M parameters"
    if params <= CPU_MAX_PARAMS:
        log.info("no CUDA GPU: training on the CPU (%s, at most %.0fM); at least ~%s per optimizer step of %d "
                 "tokens", size, CPU_MAX_PARAMS / 1e6, _duration(step_s), tokens)
        return
    raise ResourceError(f"preset '{preset}': {size}, more than the {CPU_MAX_PARAMS / 1e6:.0f}M a CPU trains in "
                        f"reasonable time: it needs a CUDA GPU, and none is visible (one optimizer step of "
                        f"{tokens:,} tokens would take at least ~{_duration(step_s)} here). Run it on a GPU host (make doctor checks one), try the "
                        "pipeline with --model-config tiny or a smaller --model, or force it with --set allow_cpu=true")


def cpu_step_seconds(params: int, tokens: int) -> float:
    """A lower bound for one QLoRA optimizer step on this CPU: ~6 FLOPs per parameter per token (forward, input
    gradients, recomputation under gradient checkpointing) at the fp32 matmul speed measured here."""
    import time

    a = torch.randn(512, 512)
    torch.mm(a, a)  # warm-up
    t0 = time.perf_counter()
    for _ in range(4):
        torch.mm(a, a)
    flops_per_s = 4 * 2 * 512**3 / max(time.perf_counter() - t0, 1e-9)
    return 6 * params * tokens / flops_per_s


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    from training.model_check import explain_load_error

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(explain_load_error(model_path, exc)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches need a pad id; labels mask it anyway
    return tokenizer


def model_type_of(model_path: str) -> str | None:
    """The architecture's model_type from config.json (local folder or the hub's few-KB config), or None."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_path).model_type
    except (OSError, ValueError):
        return None


def plan_for_device(cfg: QLoRAConfig, device: Device, backend: str) -> tuple[QLoRAConfig, str]:
    """On CUDA, let the VRAM planner choose micro-batch and per-layer checkpointing for the card, keeping the
    tokens per optimizer step of the preset. `backend` is what was applied (training.backends.apply_backend), and
    cfg.attn_implementation the attention that will run. Returns the updated config and a log line."""
    from dataclasses import replace

    from training.plan import PlanError, arch_for, plan

    if device.kind != "cuda" or not cfg.plan_memory:
        return cfg, "planner off (CPU or plan_memory=false): micro-batch and checkpointing as configured"
    gpu_mem = cfg.gpu_mem_gib or device.memory_gib or 0.0
    sequences = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    try:
        arch = arch_for(cfg.model_name_or_path)  # known table, else the (builtin-resolved) config.json
        p = plan(arch, sequences, cfg.max_seq_length, cfg.lora_r, gpu_mem, "unsloth" if backend == "unsloth" else "hf",
                 fused_loss=backend in ("unsloth", "hf+liger"),  # both never materialise the logits
                 eager_attention=cfg.attn_implementation in ("eager", "auto"), max_micro_batch=cfg.max_micro_batch,
                 fp32_embeddings=cfg.fp32_norms_and_embeddings)
    except PlanError as exc:
        raise ResourceError(str(exc)) from None
    new = replace(cfg, per_device_train_batch_size=p.micro_batch, gradient_accumulation_steps=p.gradient_accumulation_steps,
                  gradient_checkpointing=p.gradient_checkpointing, recompute_layers=p.recompute_layers)
    ckpt = f"on for {p.recompute_layers} of {arch.num_layers} layers" if p.gradient_checkpointing else "off"
    return new, (f"planner ({gpu_mem:.0f} GiB card, {backend}, {cfg.attn_implementation} attention): micro-batch "
                 f"{p.micro_batch} x accumulation {p.gradient_accumulation_steps}, gradient checkpointing {ckpt}, "
                 f"predicted peak {p.predicted_peak_gib:.1f} GiB ({p.reason})")


UNSLOTH_IGNORES = {"target_modules": "all-linear", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                   "fused_lora": True, "fp32_norms_and_embeddings": False}


def load_qlora_model(cfg: QLoRAConfig, model_path: str, device: Device, backend: str = "hf"):
    """Base weights in 4-bit NF4 (+ double quant) with LoRA on all linear layers, through the applied backend:
    'unsloth', 'hf+liger' (transformers + peft with Liger kernels, patched by training.backends.apply_backend)
    or 'hf'. The Trainer is told not to checkpoint: this sets checkpointing up, per layer."""
    if backend == "unsloth":
        from training.backends import LORA_TARGETS, load_unsloth

        for key, honoured in UNSLOTH_IGNORES.items():
            if getattr(cfg, key) != honoured:
                log.warning("backend unsloth ignores %s=%s (it uses %s)", key, getattr(cfg, key), honoured)
        model = load_unsloth(model_path, cfg.max_seq_length, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                             cfg.gradient_checkpointing, cfg.seed)
        log.info("model %s: unsloth 4-bit NF4, LoRA r=%d on %s", model_path, cfg.lora_r, ", ".join(LORA_TARGETS))
        return model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from training.distributed import fsdp_enabled, local_rank
    from training.fast_lora import apply_fused_lora
    from training.model_check import explain_load_error

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
    prepare_for_kbit_training(model, cfg.fp32_norms_and_embeddings)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    fused = apply_fused_lora(model) if cfg.fused_lora else 0
    recomputed = enable_checkpointing(model, cfg.recompute_layers) if cfg.gradient_checkpointing else 0
    trainable, total = model.get_nb_trainable_parameters()
    log.info("model %s: 4-bit %s%s, LoRA r=%d on %s: %s trainable of %s parameters (%.2f%%); %s attention, "
             "fused LoRA on %d layers, %s norms/embeddings, %d layers recomputed", model_path,
             cfg.bnb_4bit_quant_type, " + double quant" if cfg.bnb_4bit_use_double_quant else "", cfg.lora_r,
             cfg.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
             model.config._attn_implementation, fused, "fp32" if cfg.fp32_norms_and_embeddings else "compute-dtype",
             recomputed)
    return model


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
