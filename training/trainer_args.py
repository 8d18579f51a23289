"""The Trainer's settings: the config's trainer knobs pass through to TRL's SFTConfig by name, SFTConfig validates
them, and the recipe sets the rest itself.

- `QLoRAConfig` fields that are also SFTConfig fields (learning_rate, optim, save_steps, ...) pass through as they are.
- Any other SFTConfig argument can be given by name (`--set adam_beta2=0.95`, or a YAML key): it is kept in
  `QLoRAConfig.trainer_args` and passed through too.
- `RECIPE_OWNED` are decided by the recipe (where files go, precision from the device, checkpointing per layer by the
  backend's loader, resume bookkeeping): asking for one is an error that names the knob to use instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

# SFTConfig argument -> why the recipe sets it (and what to use instead)
RECIPE_OWNED = {
    "output_dir": "--output-dir", "run_name": "--run-name", "logging_dir": "the run folder's runs/",
    "bf16": "the config key bf16 (auto|true|false)", "fp16": "the config key bf16 (auto|true|false)",
    "use_cpu": "the config key device", "gradient_checkpointing": "the config key gradient_checkpointing",
    "activation_checkpointing": "the config key gradient_checkpointing",
    "gradient_checkpointing_kwargs": "the config key gradient_checkpointing",
    "activation_checkpointing_kwargs": "the config key gradient_checkpointing",
    "max_length": "the config key max_seq_length", "report_to": "the config key report_to",
    "save_strategy": "the config key save_steps", "save_total_limit": "the config key keep_checkpoints",
    "eval_strategy": "the config keys eval_fraction and eval_steps", "data_seed": "the config key seed",
    "ignore_data_skip": "the config key resume_with_new_data", "resume_from_checkpoint": "--resume",
    "disable_tqdm": "the progress line of training/metrics.py", "include_num_input_tokens_seen": "(always counted)",
    "per_device_eval_batch_size": "the config key per_device_train_batch_size",
    "ddp_find_unused_parameters": "(always off: every LoRA parameter gets a gradient)",
    "use_liger_kernel": "the config key backend (training/backends.py applies Liger's kernels itself)",
    "logging_first_step": "(always on: the first step's loss is the run's baseline)",
    "fsdp": "GPUS=N FSDP=1 (accelerate's FSDP config, docs/multi_gpu.md)",
    "fsdp_config": "GPUS=N FSDP=1 (accelerate's FSDP config, docs/multi_gpu.md)",
    "deepspeed": "GPUS=N FSDP=1 (DeepSpeed is not supported; FSDP shards the model)",
    "save_only_model": "(checkpoints keep the optimizer and scheduler: resume needs them)",
}
# Same name in QLoRAConfig and SFTConfig, but a different meaning: the recipe translates them itself (precision from
# the device, checkpointing per layer in the loader, W&B made safe; the prompt mask is built by training/data.py)
NOT_PASSED = {"bf16", "gradient_checkpointing", "report_to", "completion_only_loss"}


@functools.lru_cache(maxsize=1)
def sft_fields() -> dict[str, Any]:
    """SFTConfig's arguments and their defaults (imports trl: called only when a key needs it)."""
    from trl import SFTConfig

    return {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}


def passed_through(cfg) -> dict[str, Any]:
    """The config's trainer settings, by name, plus the extra SFTConfig arguments given by name."""
    own = {f.name for f in dataclasses.fields(cfg)} - NOT_PASSED - {"trainer_args"}
    return {**{k: getattr(cfg, k) for k in own & sft_fields().keys()}, **dict(cfg.trainer_args)}


def sft_config(cfg, device, paths, has_eval: bool, processes: int, data_changed: bool):
    """The SFTConfig of a run: what the config passes through, then what the recipe decides."""
    from trl import SFTConfig

    return SFTConfig(**passed_through(cfg), **recipe_settings(cfg, device, paths, has_eval, processes, data_changed))


def recipe_settings(cfg, device, paths, has_eval: bool, processes: int, data_changed: bool) -> dict[str, Any]:
    """What the recipe sets itself (every key is in RECIPE_OWNED, so the config can never pass it too)."""
    from training.tracking import resolve_report_to

    names = sft_fields()
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return dict(
        output_dir=str(paths.run_dir),
        run_name=paths.name,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        # the loader set checkpointing up per layer (unsloth its own, with offload): the Trainer must not redo it.
        # (transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; both are accepted.)
        **{checkpointing: False, f"{checkpointing}_kwargs": {"use_reentrant": False}},
        bf16=device.bf16,
        fp16=device.fp16,
        use_cpu=device.kind == "cpu",
        max_length=cfg.max_seq_length,
        logging_first_step=True,
        save_strategy="steps",
        save_total_limit=None,  # retention happens after the completeness marker (training/checkpoints.py)
        eval_strategy="steps" if has_eval else "no",
        report_to=resolve_report_to(cfg.report_to, paths.logs_dir),  # W&B can never stop the run
        include_num_input_tokens_seen="non_padding",
        data_seed=cfg.seed,
        ignore_data_skip=data_changed,  # changed data: the checkpoint's position in it means nothing
        disable_tqdm=True,  # MetricsCallback draws its own bar with the loss
        # LoRA under DDP: every trainable parameter gets a gradient each step, so skip DDP's unused-parameter scan
        # (its default for a PeftModel), which costs a graph traversal per step and warns.
        **({"ddp_find_unused_parameters": False} if processes > 1 else {}),
    )


def trainer_key(key: str, value: Any, where: str) -> tuple[bool, Any]:
    """A key that is not a QLoRAConfig field: (True, parsed value) when it is an SFTConfig argument the recipe leaves
    to the user, else (False, None) (the caller reports an unknown key). A recipe-owned argument, or a value of the
    wrong kind, raises ValueError with the message (training/qlora_config.py makes it a ConfigError)."""
    if key in RECIPE_OWNED:
        raise ValueError(f"{where}: '{key}' is set by the recipe; use {RECIPE_OWNED[key]}")
    if key not in sft_fields():
        return False, None
    if isinstance(value, str):  # --set: YAML's scalars (0.95, true, null, [a, b]); anything else stays a string
        import yaml

        try:
            value = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            pass
    default = sft_fields()[key].default
    for typ in (bool, int, float):  # the simple knobs: a value of the wrong kind fails now, not in the optimizer
        if isinstance(default, typ) and not (isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
                                             or typ is float and isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{where}: SFTConfig's '{key}' must be {typ.__name__} (default {default!r}), "
                              f"got {value!r}")
        if isinstance(default, typ):
            break
    return True, value
