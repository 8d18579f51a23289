"""Presets, precedence and validation: every user error is a clear non-zero exit without a traceback."""

from __future__ import annotations

import pytest

from training.qlora_config import PRESETS, ConfigError, resolve_config
from training.qlora_finetune import main


def test_presets_carry_the_seed_values():
    g2 = PRESETS["gemma-2b"]
    assert (g2.model_name_or_path, g2.per_device_train_batch_size, g2.gradient_accumulation_steps) == \
        ("google/gemma-2-2b", 4, 4)
    assert (g2.optim, g2.lora_r, g2.target_modules, g2.max_steps) == ("adamw_8bit", 32, "all-linear", 1000)
    assert g2.bnb_4bit_use_double_quant and g2.bnb_4bit_quant_type == "nf4"
    assert g2.gradient_checkpointing and g2.bf16 == "auto"
    g9 = PRESETS["gemma-9b"]
    assert (g9.model_name_or_path, g9.per_device_train_batch_size, g9.max_steps) == ("google/gemma-2-9b", 2, 800)
    assert PRESETS["tiny"].allow_cpu and not g2.allow_cpu and not g9.allow_cpu


def test_precedence_defaults_preset_yaml_flags_set(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora_r: 4\nlearning_rate: 0.01\nmax_steps: 7\nsave_steps: 3\n")
    cfg = resolve_config("tiny", str(cfg_file), overrides={"max_steps": 9, "data": None},
                         set_items=["learning_rate=0.02"])
    assert cfg.weight_decay == 0.0  # dataclass default, untouched by the preset
    assert cfg.per_device_train_batch_size == PRESETS["tiny"].per_device_train_batch_size  # preset
    assert cfg.lora_r == 4 and cfg.save_steps == 3  # YAML over preset
    assert cfg.max_steps == 9  # named flag over YAML
    assert cfg.learning_rate == 0.02  # --set over everything
    assert cfg.data == PRESETS["tiny"].data  # a flag left unset does not override


@pytest.mark.parametrize("items, needle", [
    (["lora_rank=8"], "unknown config key 'lora_rank'"),
    (["lora_r=eight"], "'lora_r' must be int"),
    (["lora_r=0"], "'lora_r' must be > 0"),
    (["learning_rate=-1e-4"], "'learning_rate' must be > 0"),
    (["per_device_train_batch_size=0"], "'per_device_train_batch_size' must be > 0"),
    (["gradient_checkpointing=maybe"], "'gradient_checkpointing' must be bool"),
    (["lora_dropout=1.5"], "'lora_dropout' must be in [0, 1)"),
    (["optim=sgd"], "'optim' must be one of"),
    (["report_to=mlflow"], "'report_to' entries must be among"),
    (["target_modules=[q_proj"], "'target_modules' must be all-linear or a regular expression"),
    (["novalue"], "expected key=value"),
])
def test_invalid_overrides_name_the_key(items, needle):
    with pytest.raises(ConfigError) as err:
        resolve_config("tiny", set_items=items)
    assert needle in str(err.value)


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora_rr: 8\n")
    with pytest.raises(ConfigError) as err:
        resolve_config("tiny", str(f))
    msg = str(err.value)
    assert "lora_rr" in msg and "Did you mean 'lora_r'" in msg and "Valid keys:" in msg and "max_steps" in msg


def test_yaml_wrong_type_and_broken_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_steps: [1, 2]\n")
    with pytest.raises(ConfigError, match="'max_steps' must be int"):
        resolve_config("tiny", str(f))
    f.write_text("max_steps: 3\n  bad: indentation: here\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: not valid YAML"):
        resolve_config("tiny", str(f))
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config("tiny", str(tmp_path / "missing.yaml"))


def test_custom_preset_requires_a_model():
    with pytest.raises(ConfigError, match="--model ID_OR_PATH"):
        resolve_config("custom")
    assert resolve_config("custom", overrides={"model_name_or_path": "org/model"}).model_name_or_path == "org/model"


@pytest.mark.parametrize("argv, needle", [
    (["--model-config", "gemma-27b"], "unknown preset 'gemma-27b'. Valid presets: tiny, gemma-2b, gemma-9b, custom"),
    (["--set", "lora_r=-3"], "'lora_r' must be > 0"),
    (["--set", "warmup=3"], "unknown config key 'warmup'"),
])
def test_cli_exits_2_with_message_and_no_traceback(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_subprocess_error_has_no_traceback(recipe, tmp_path):
    proc = recipe(["--model-config", "tiny", "--set", "max_steps=abc", "--logs-dir", str(tmp_path)])
    assert proc.returncode == 2
    assert "'max_steps' must be int" in proc.stderr and "Traceback" not in proc.stderr


def test_trainer_settings_pass_through_to_sftconfig(tmp_path):
    """The config's trainer knobs reach SFTConfig by name; any other SFTConfig argument can be given by name; the
    recipe's own settings cannot be overridden, and a wrong kind of value fails at once, naming the key."""
    import torch

    from training.device import Device
    from training.runfiles import RunPaths
    from training.trainer_args import sft_config

    cfg = resolve_config("tiny", set_items=["adam_beta2=0.95", "learning_rate=1e-3", "lr_scheduler_kwargs={}",
                                            "save_steps=7"])
    assert cfg.trainer_args == {"adam_beta2": 0.95, "lr_scheduler_kwargs": {}}
    args = sft_config(cfg, Device("cpu", "CPU", None, torch.float32, False, False),
                      RunPaths.of("t", tmp_path / "out", logs_root=tmp_path / "logs"), has_eval=True, processes=1,
                      data_changed=False)
    assert (args.adam_beta2, args.learning_rate, args.save_steps, args.max_steps) == (0.95, 1e-3, 7, cfg.max_steps)
    assert args.optim == cfg.optim and args.packing == cfg.packing and args.seed == args.data_seed == cfg.seed
    assert args.output_dir == str(tmp_path / "out") and args.save_total_limit is None and args.use_cpu
    assert not getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", None))
    with pytest.raises(ConfigError, match="'output_dir' is set by the recipe; use --output-dir"):
        resolve_config("tiny", set_items=["output_dir=/tmp/x"])
    from training.trainer_args import RECIPE_OWNED, recipe_settings

    owned = recipe_settings(cfg, Device("cpu", "CPU", None, torch.float32, False, False),
                            RunPaths.of("t", tmp_path / "out"), has_eval=True, processes=2, data_changed=True)
    assert set(owned) <= set(RECIPE_OWNED)  # so a config key can never collide with one the recipe sets
    with pytest.raises(ConfigError, match="'logging_first_step' is set by the recipe"):
        resolve_config("tiny", set_items=["logging_first_step=false"])
    with pytest.raises(ConfigError, match="'adam_beta2' must be float"):
        resolve_config("tiny", set_items=["adam_beta2=high"])
    with pytest.raises(ConfigError, match=r"(?s)unknown config key 'adam_beta9'.*SFTConfig"):
        resolve_config("tiny", set_items=["adam_beta9=0.9"])
