"""The base model in 4-bit NF4 (QLoRA) with LoRA adapters on all linear layers, and the device it runs on.

CUDA when present (bf16 compute if the card has it, else fp16); otherwise the CPU with fp32 compute through
the same bitsandbytes 4-bit path. Resource checks run before anything large is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from training.qlora_config import QLoRAConfig

log = logging.getLogger("training")


class ResourceError(RuntimeError):
    """The machine cannot run this preset; the message says what is missing and what to do instead."""


class ModelLoadError(RuntimeError):
    """The base model or tokenizer cannot be loaded (missing path, gated repo, no network...)."""


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
    if not cfg.allow_cpu:
        raise ResourceError(f"preset '{preset}' ({cfg.model_name_or_path}) needs a CUDA GPU with at least "
                            f"{cfg.min_gpu_mem_gib:g} GiB, and none is visible: on a CPU one step would take hours. "
                            "Run it on a GPU host (make doctor checks one), try the pipeline with "
                            "--model-config tiny, or force it with --set allow_cpu=true")
    return Device("cpu", "CPU", None, torch.float32, False, False)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_hint(model_path, exc)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches need a pad id; labels mask it anyway
    return tokenizer


def _load_hint(model_path: str, exc: Exception) -> str:
    text = str(exc)
    hint = "check the id or path (a local folder needs config.json and the weights)"
    if "gated" in text.lower() or "401" in text or "403" in text:
        hint = (f"'{model_path}' is gated: accept its licence on huggingface.co, create a read token and "
                "export HF_TOKEN=hf_... before running")
    elif "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
        hint = ("the Hugging Face hub is unreachable: download the model once with network access "
                "(see models/README.md) or pass --model /path/to/local/folder")
    return f"cannot load '{model_path}': {text.splitlines()[0] if text else type(exc).__name__}\n-> {hint}"


def load_qlora_model(cfg: QLoRAConfig, model_path: str, device: Device):
    """Base weights in 4-bit NF4 (+ double quant), prepared for k-bit training, with LoRA on all linear layers."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=device.compute_dtype,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            quantization_config=quant,
            dtype=device.compute_dtype,
            attn_implementation=cfg.attn_implementation,
            device_map={"": 0 if device.kind == "cuda" else "cpu"},
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_hint(model_path, exc)) from None
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("model %s: 4-bit %s%s, LoRA r=%d on %s: %s trainable of %s parameters (%.2f%%)", model_path,
             cfg.bnb_4bit_quant_type, " + double quant" if cfg.bnb_4bit_use_double_quant else "", cfg.lora_r,
             cfg.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model
