"""The device a run trains on and its precision: CUDA when present (bf16 compute if the card has it, else fp16);
otherwise the CPU with fp32 compute through the same bitsandbytes 4-bit path, for base models small enough for it.
Resource checks run before anything large is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from training.console import rough_duration
from training.errors import UserError
from training.qlora_config import QLoRAConfig

log = logging.getLogger("training")


class ResourceError(UserError, RuntimeError):
    """The machine cannot run this preset; the message says what is missing and what to do instead."""


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
    from training.model import count_parameters

    if cfg.allow_cpu:
        log.info("no CUDA GPU: training on the CPU (allow_cpu=true)")
        return
    params = count_parameters(cfg.model_name_or_path)
    tokens = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.max_seq_length
    step_s = cpu_step_seconds(params, tokens)
    size = f"{cfg.model_name_or_path} has {params / 1e6:,.{0 if params >= 1e7 else 1}f}M parameters"
    if params <= CPU_MAX_PARAMS:
        log.info("no CUDA GPU: training on the CPU (%s, at most %.0fM); at least ~%s per optimizer step of %d "
                 "tokens", size, CPU_MAX_PARAMS / 1e6, rough_duration(step_s), tokens)
        return
    raise ResourceError(f"preset '{preset}': {size}, more than the {CPU_MAX_PARAMS / 1e6:.0f}M a CPU trains in "
                        f"reasonable time: it needs a CUDA GPU, and none is visible (one optimizer step of "
                        f"{tokens:,} tokens would take at least ~{rough_duration(step_s)} here). Run it on a GPU host (make doctor checks one), try the "
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
