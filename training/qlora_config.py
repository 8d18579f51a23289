"""Typed presets for the QLoRA recipe, and how a run's config is resolved.

Precedence, lowest first: dataclass defaults < preset < YAML file (--config) < CLI flags (named flags, then --set).
Every knob has one line of why. Unknown keys, wrong types and invalid values raise ConfigError, whose message
names the key and lists what is valid; the CLI prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from training.errors import UserError


class ConfigError(UserError, ValueError):
    """Bad user input in a config: the message says what, where and how to fix it."""


@dataclass(frozen=True)
class QLoRAConfig:
    # --- model ---
    model_name_or_path: str = ""  # HF hub id or local folder of the base model
    attn_implementation: str = "auto"  # auto on CUDA: flash_attention_4 (Hopper/datacenter Blackwell), else flex_attention, each after its self-check, else eager; by name they are self-checked too; sdpa drops Gemma-2's soft-cap
    backend: str = "auto"  # auto = hf: transformers + peft + bitsandbytes (+ Liger kernels on CUDA); unsloth only by name (the fast extra)
    plan_memory: bool = True  # on CUDA the VRAM planner picks micro-batch and checkpointing, keeping tokens per step
    gpu_mem_gib: float = 0.0  # plan for this much GPU memory (0: the card's); e.g. 24 to plan a 4090 run on an H100
    max_micro_batch: int = 16  # the planner never goes above this micro-batch
    oom_retry: bool = False  # on CUDA out of memory: halve the micro-batch (same tokens per step), retry once
    device: str = "auto"  # auto: CUDA when present, else the CPU; cpu/cuda force it
    min_gpu_mem_gib: float = 0.0  # refuse to start below this much GPU memory (0: no check)
    allow_cpu: bool = False  # without a GPU, base models over 400M parameters are refused (hours per step); true forces
    # --- quantisation (QLoRA: base weights always in 4 bits, ~4x less memory than bf16) ---
    bnb_4bit_quant_type: str = "nf4"  # NF4 fits normally distributed weights better than fp4
    bnb_4bit_use_double_quant: bool = True  # quantise the quantisation constants too: ~0.4 bit/param saved
    # --- LoRA ---
    lora_r: int = 32  # higher: more capacity, more memory
    lora_alpha: int = 16  # scale of the LoRA update is alpha / r
    lora_dropout: float = 0.0  # 0 keeps unsloth's fused LoRA kernels; at fine-tuning data scale dropout buys little
    target_modules: str = "all-linear"  # LoRA on every linear layer (QLoRA paper: best quality per byte)
    fused_lora: bool = True  # base matmul + adapter in one autograd function (training/fast_lora.py): fewer passes
    lm_head: str = "auto"  # auto: liger where Liger is applied on CUDA (+6% on full rows), else trl (training/lm_head.py)
    fp8_backward: bool = False  # backward's products with the frozen base in FP8 (e4m3, per-row scales; Ada/Hopper); forward exact; opt-in
    fp32_norms_and_embeddings: bool = False  # peft's upcast of frozen norms/embeddings: +2.2 GiB on 2B, ~1.4x slower
    # --- data ---
    data: str = ""  # file or folder of .jsonl/.json/.parquet/.csv, or a save_to_disk dataset
    max_seq_length: int = 2048  # longer samples are truncated (validate-data reports how many)
    eval_fraction: float = 0.05  # share of records held out for evaluation (deterministic split)
    completion_only_loss: bool = True  # learn the answers, not the prompts
    chat_template: str = ""  # a Jinja file replacing the tokenizer's own chat template ("": the model's own)
    # --- optimisation ---
    per_device_train_batch_size: int = 4  # micro-batch per GPU
    gradient_accumulation_steps: int = 4  # effective batch = micro-batch x accumulation x GPUs
    max_steps: int = 1000  # optimizer steps
    learning_rate: float = 2e-4  # the QLoRA paper's value for 7B-class models
    lr_scheduler_type: str = "cosine"  # smooth decay to 0 at max_steps
    warmup_steps: int = 30  # avoid large early updates on a fresh adapter
    weight_decay: float = 0.0  # LoRA adapters rarely need it
    max_grad_norm: float = 0.3  # QLoRA paper: clipping keeps 4-bit training stable
    optim: str = "adamw_8bit"  # bitsandbytes 8-bit AdamW: optimizer state in 8 bits
    gradient_checkpointing: bool = True  # recompute activations in backward: much less memory, ~30% slower
    recompute_layers: int = -1  # with checkpointing, how many layers recompute (-1: all); the planner keeps the rest
    bf16: str = "auto"  # auto: bf16 on cards that have it (Ampere+), else fp16; fp32 on the CPU
    packing: bool = True  # pack short samples into full rows, padding-free; exact (per-sample masks); false: a row each
    seed: int = 42  # same seed, same data order and initialisation
    resume_with_new_data: bool = False  # resume although the data changed: its position is reset (else refused)
    # --- logging and checkpoints ---
    logging_steps: int = 10  # metrics every N optimizer steps
    save_steps: int = 100  # checkpoint every N steps: the most work a crash can cost
    keep_checkpoints: int = 3  # newest complete checkpoints kept per run (the backup keeps its own)
    eval_steps: int = 100  # evaluate every N steps when there is an eval split
    disk_check: bool = True  # refuse to start when the run's checkpoints and adapter cannot fit the output disk
    eval_prompts: int = 4  # end of run: greedy answers of base and adapter to this many held-out prompts (eval.json)
    eval_max_new_tokens: int = 64  # ... each at most this long
    report_to: str = "tensorboard"  # comma-separated: tensorboard, wandb
    dataloader_num_workers: int = 2  # background data loading; 0 on the CPU
    # --- any other TRL SFTConfig argument, given by name (--set adam_beta2=0.95): passed through as it is ---
    trainer_args: dict = field(default_factory=dict)


PRESETS: dict[str, QLoRAConfig] = {
    "tiny": QLoRAConfig(
        model_name_or_path="builtin:tiny-gemma2",  # built locally by training/tiny.py, no download
        data="datasets/sample",
        device="auto",
        allow_cpu=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        max_seq_length=256,
        per_device_train_batch_size=2,  # packed rows of 256 tokens, ~5 sample chats each: ~10 chats per step
        gradient_accumulation_steps=1,
        max_steps=60,
        learning_rate=3e-3,  # a random-init base learns fast only with a large step
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=5,
        max_grad_norm=1.0,
        logging_steps=5,
        save_steps=20,
        eval_steps=20,
        eval_prompts=2,  # a random-init base never stops talking: keep the end-of-run evaluation short
        eval_max_new_tokens=16,
        dataloader_num_workers=0,
    ),
    "gemma-2b": QLoRAConfig(
        model_name_or_path="google/gemma-2-2b",
        data="datasets/processed",
        min_gpu_mem_gib=8.0,
        lora_r=32,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        max_steps=1000,
    ),
    "gemma-9b": QLoRAConfig(
        model_name_or_path="google/gemma-2-9b",
        data="datasets/processed",
        min_gpu_mem_gib=16.0,
        lora_r=32,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,  # keeps 16 sequences per optimizer step, like gemma-2b
        max_steps=800,
        learning_rate=1e-4,  # larger model, smaller step
    ),
    "custom": QLoRAConfig(
        model_name_or_path="",  # required: --model ID_OR_PATH
        data="datasets/processed",
    ),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "attn_implementation": ("auto", "eager", "sdpa", "flash_attention_2", "flex_attention", "flash_attention_4"),
    "device": ("auto", "cpu", "cuda"),
    "lm_head": ("auto", "trl", "liger"),
    "backend": ("auto", "unsloth", "hf"),
    "bnb_4bit_quant_type": ("nf4", "fp4"),
    "bf16": ("auto", "true", "false"),
    "lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"),
    "optim": ("adamw_8bit", "paged_adamw_8bit", "adamw_torch", "paged_adamw_32bit", "adamw_torch_fused"),
}
# The optimizer state each optim keeps in a checkpoint: a run resumes only with an optim of the same kind.
OPTIM_STATE = {"adamw_8bit": "bitsandbytes 8-bit", "paged_adamw_8bit": "bitsandbytes 8-bit",
               "paged_adamw_32bit": "bitsandbytes 32-bit", "adamw_torch": "PyTorch", "adamw_torch_fused": "PyTorch"}


def eight_bit_moments(optim: str) -> bool:
    """Whether `optim` keeps 8-bit Adam moments (what the planner and the disk check count for it)."""
    return OPTIM_STATE.get(optim) == "bitsandbytes 8-bit"


POSITIVE = ("max_micro_batch", "lora_r", "lora_alpha", "max_seq_length", "per_device_train_batch_size", "gradient_accumulation_steps",
            "max_steps", "learning_rate", "logging_steps", "save_steps", "eval_steps", "keep_checkpoints",
            "eval_max_new_tokens")
NON_NEGATIVE = ("gpu_mem_gib", "warmup_steps", "weight_decay", "max_grad_norm", "min_gpu_mem_gib", "dataloader_num_workers",
                "eval_prompts")
FRACTIONS = ("lora_dropout", "eval_fraction")  # in [0, 1)
REPORT_TARGETS = ("tensorboard", "wandb", "none")

# The keys a config sets by name (trainer_args is filled from the other SFTConfig arguments, never set itself)
FIELD_TYPES: dict[str, type] = {k: t for k, t in typing.get_type_hints(QLoRAConfig).items() if k != "trainer_args"}


def valid_keys() -> list[str]:
    return list(FIELD_TYPES)


def _unknown_key_message(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (f"unknown config key '{key}' ({where}).{hint}\n"
            f"Valid keys: {', '.join(valid_keys())}; or any argument of TRL's SFTConfig that the recipe does not set "
            "itself (training/trainer_args.py), e.g. adam_beta2")


def coerce(key: str, value: Any, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise ConfigError naming the key."""
    if key not in FIELD_TYPES:
        raise ConfigError(_unknown_key_message(key, where))
    typ = FIELD_TYPES[key]
    bad = ConfigError(f"{where}: '{key}' must be {typ.__name__}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if typ is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if typ is str:
        if key == "bf16" and isinstance(value, bool):
            return str(value).lower()
        if key == "report_to" and isinstance(value, list):
            return ",".join(str(v) for v in value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad  # pragma: no cover - every field is bool/int/float/str


def validate(cfg: QLoRAConfig, preset: str) -> None:
    """Reject values that would fail later, or silently do the wrong thing."""
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"'{key}' must be > 0, got {getattr(cfg, key)} (preset '{preset}')")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {getattr(cfg, key)} (preset '{preset}')")
    if cfg.fp8_backward and not cfg.fused_lora:
        raise ConfigError("'fp8_backward' runs inside the fused LoRA function: it needs fused_lora=true "
                          "(or drop --set fp8_backward=true)")
    if cfg.target_modules != "all-linear":  # else peft matches it as a regular expression on module names
        try:
            re.compile(cfg.target_modules)
        except re.error as exc:
            raise ConfigError(f"'target_modules' must be all-linear or a regular expression on module names (peft's "
                              f"rule), e.g. '.*(q|k|v|o)_proj'; '{cfg.target_modules}' is not one: {exc}") from None
    if cfg.recompute_layers < -1:
        raise ConfigError(f"'recompute_layers' must be -1 (all) or >= 0, got {cfg.recompute_layers}")
    for key in FRACTIONS:
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be in [0, 1), got {getattr(cfg, key)}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"'{key}' must be one of {', '.join(allowed)}; got '{getattr(cfg, key)}'")
    for target in filter(None, (t.strip() for t in cfg.report_to.split(","))):
        if target not in REPORT_TARGETS:
            raise ConfigError(f"'report_to' entries must be among {', '.join(REPORT_TARGETS)}; got '{target}'")
    if not cfg.model_name_or_path:
        raise ConfigError(f"preset '{preset}' needs a base model: pass --model ID_OR_PATH "
                          "(a Hugging Face id such as google/gemma-2-2b, or a local folder)")
    if not cfg.data:
        raise ConfigError("no training data: pass --data PATH (a file or folder of .jsonl/.json/.parquet/.csv)")


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_set(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lora_r=16")
        out[key.strip()] = value.strip()
    return out


def resolve_config(preset: str, yaml_path: str | None = None, overrides: dict[str, Any] | None = None,
                   set_items: list[str] | None = None) -> QLoRAConfig:
    """defaults < preset < YAML < named CLI flags (overrides) < --set."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'. Valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    layers: list[tuple[str, dict[str, Any]]] = []
    if yaml_path:
        layers.append((f"--config {yaml_path}", load_yaml(yaml_path)))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))
    layers.append(("--set", parse_set(set_items or [])))
    for where, values in layers:
        own = {k: v for k, v in values.items() if k in FIELD_TYPES}
        cfg = replace(cfg, **{k: coerce(k, v, where) for k, v in own.items()},
                      trainer_args={**cfg.trainer_args, **trainer_keys(values.keys() - own.keys(), values, where)})
    validate(cfg, preset)
    return cfg


def trainer_keys(keys, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Keys that are not the config's own: TRL SFTConfig arguments (training/trainer_args.py), else ConfigError."""
    if not keys:
        return {}
    from training.trainer_args import trainer_key

    out = {}
    for key in sorted(keys):
        try:
            known, value = trainer_key(key, values[key], where)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not known:
            raise ConfigError(_unknown_key_message(key, where))
        out[key] = value
    return out


def to_dict(cfg: QLoRAConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = ["QLoRAConfig", "PRESETS", "ConfigError", "resolve_config", "to_dict", "valid_keys"]
