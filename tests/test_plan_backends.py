"""VRAM planner arithmetic and backend selection (the GPU side is measured by scripts/benchmark.py on a card)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace

import pytest
import torch

from training.backends import BackendError, HFBackend, _run_self_check_subprocess, choose_backend
from training.device import Device
from training.model import AttentionShape
from training.plan import (GIB, KNOWN_ARCHS, LOGIT_BYTES, NF4_BYTES_PER_PARAM, Arch, PlanError, budget_gib,
                           estimate_peak, main, plan, plan_for_run, recompute_act_for)
from training.qlora_config import PRESETS

TINY = Arch(num_layers=2, hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=2, head_dim=16)


def test_parameter_counts_by_hand():
    # per layer: q 64x64, k and v 64x32, o 64x64, gate/up/down 64x128 -> 4096+2048+2048+4096+3*8192
    assert TINY.linear_params() == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    # LoRA r=8: r*(in+out) per linear
    assert TINY.lora_params(8) == 2 * 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    # Gemma-2-2B's published size: 2.6B parameters, of which 0.59B embedding
    g2 = KNOWN_ARCHS["google/gemma-2-2b"]
    assert 1.9e9 < g2.linear_params() < 2.1e9 and g2.vocab * g2.hidden == 589_824_000


def test_planner_lora_count_matches_peft_on_the_tiny_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    arch = Arch.from_config(model.config)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert arch.lora_params(8) == trainable == 16_384


def test_estimate_by_hand():
    est = estimate_peak(TINY, micro_batch=2, seq_len=128, lora_r=8, backend="hf", gradient_checkpointing=True,
                        fused_loss=False, eager_attention=True)
    tokens = 2 * 128
    weights = TINY.linear_params() * NF4_BYTES_PER_PARAM + 512 * 64 * 4
    lora = TINY.lora_params(8) * 10
    acts = tokens * (2 * 64 * 4.0 + 128 * 40.0) + 2 * 4 * 128 * 128 * 10.0
    logits = tokens * 512 * LOGIT_BYTES
    assert est.peak_gib == round((weights + lora + acts + logits) / GIB, 2)
    assert est.logits_gib == round(logits / GIB, 2)
    fused = estimate_peak(TINY, 2, 128, 8, "hf", True, fused_loss=True)
    assert fused.logits_gib == 0


def test_estimates_match_the_h100_measurements_within_15_percent():
    """The shared H100 baseline measurements the constants were fitted on (../shared/bench/baseline-h100.json)."""
    g2, g9 = KNOWN_ARCHS["google/gemma-2-2b"], KNOWN_ARCHS["google/gemma-2-9b"]
    cases = [(g2, 4, False, True, "hf", 44.66), (g2, 1, False, True, "hf", 13.74), (g2, 4, True, False, "hf", 8.30),
             (g9, 2, False, True, "hf", 29.96), (g9, 2, True, False, "hf", 12.77), (g2, 4, True, True, "unsloth", 4.06)]
    for arch, bs, fused, eager, backend, measured in cases:
        est = estimate_peak(arch, bs, 2048, 32, backend, True, fused, eager).peak_gib
        assert abs(est / measured - 1) < 0.15, (arch, bs, est, measured)


def test_plan_keeps_tokens_per_step_and_fits():
    g2 = KNOWN_ARCHS["google/gemma-2-2b"]
    p = plan(g2, 16, 2048, 32, 24, "hf", fused_loss=True)
    assert p.micro_batch * p.gradient_accumulation_steps == 16
    assert p.predicted_peak_gib <= budget_gib(24)
    bigger = estimate_peak(g2, p.micro_batch * 2, 2048, 32, "hf", True, True, True)
    assert bigger.peak_gib > budget_gib(24)  # the largest that fits
    # without the fused loss the 256k-vocab logits dominate: a smaller micro-batch
    unfused = plan(g2, 16, 2048, 32, 24, "hf", fused_loss=False)
    assert unfused.micro_batch < p.micro_batch
    assert plan(g2, 16, 2048, 32, 24, "hf", max_micro_batch=2).micro_batch == 2


def test_plan_turns_checkpointing_off_only_when_it_fits():
    assert plan(TINY, 8, 256, 8, 80, "hf").gradient_checkpointing is False
    g2 = KNOWN_ARCHS["google/gemma-2-2b"]
    assert plan(g2, 16, 2048, 32, 24, "hf").gradient_checkpointing is True


def test_the_plan_does_not_count_the_gated_activation_where_the_fused_path_recomputes_it(monkeypatch):
    """The fused path keeps gate's and up's outputs, not act(gate) * up (training/fast_lora.py LoRA4bitGatedDown;
    tests/test_fast_path.py counts what it keeps): 2 bytes per intermediate unit per token less for each layer that
    keeps its activations. On an 80 GB card 2B then keeps all its layers, where it recomputed 3."""
    arch = KNOWN_ARCHS["google/gemma-2-2b"]
    kw = dict(fused_loss=True, eager_attention=False, fp32_embeddings=False)
    for recomputed in (0, 20):
        kept, dropped = (estimate_peak(arch, 16, 2048, 32, "hf", recomputed > 0, recompute_layers=recomputed,
                                       recompute_act=act, **kw) for act in (False, True))
        per_layer = 16 * 2048 * arch.intermediate * 2 / GIB  # 0.5625 GiB
        assert kept.peak_gib - dropped.peak_gib == pytest.approx((26 - recomputed) * per_layer, abs=0.02)
    assert plan(arch, 16, 2048, 32, 79.6, recompute_act=False, **kw).recompute_layers == 3
    assert plan(arch, 16, 2048, 32, 79.6, recompute_act=True, **kw).recompute_layers == 0
    cfg, llama = PRESETS["gemma-2b"], replace(arch, model_type="llama", activation="silu")
    assert recompute_act_for(cfg, "hf", arch) and recompute_act_for(cfg, "hf", llama)
    assert recompute_act_for(replace(cfg, target_modules=".*_proj"), "hf", arch)
    for case in ((cfg, "unsloth", arch), (replace(cfg, fused_lora=False), "hf", arch),
                 (replace(cfg, fp8_backward=True), "hf", arch), (cfg, "hf", replace(arch, model_type="phi3")),
                 (cfg, "hf", replace(arch, activation="gelu")),  # exact GELU: not an activation the kernels compute
                 (replace(cfg, lora_dropout=0.05), "hf", arch),  # dropout: peft's own forward, the product kept
                 (replace(cfg, target_modules=".*(q|k|v|o)_proj"), "hf", arch)):  # no LoRA on the MLP
        assert not recompute_act_for(*case), case
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # fused LoRA is off under FSDP
    assert not recompute_act_for(cfg, "hf", arch)


def test_plan_error_when_nothing_fits():
    with pytest.raises(PlanError, match="micro-batch 1 needs about"):
        plan(KNOWN_ARCHS["google/gemma-2-9b"], 16, 2048, 32, 8, "hf", fused_loss=False)


def test_plan_cli(capsys):
    assert main(["--preset", "gemma-2b", "--gpu-mem", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["micro_batch"] * out["gradient_accumulation_steps"] == 16 and out["gpu_mem_gib"] == 24
    assert main(["--preset", "gemma-9b", "--gpu-mem", "6"]) == 2
    assert "Shorten sequences" in capsys.readouterr().err


LIGER, NO_LIGER = HFBackend(True, "Liger applied"), HFBackend(False, "Liger not applied")


def test_trainer_uses_the_planner_choice():
    cfg = PRESETS["gemma-2b"]
    card = Device("cuda", "RTX 4090", 24.0, torch.bfloat16, True, False)
    planned, line = plan_for_run(cfg, card, LIGER)
    expected = plan(KNOWN_ARCHS["google/gemma-2-2b"], 16, cfg.max_seq_length, cfg.lora_r, 24.0, "hf",
                    fused_loss=True, max_micro_batch=cfg.max_micro_batch, fp32_embeddings=False)
    assert planned.per_device_train_batch_size == expected.micro_batch
    assert planned.gradient_accumulation_steps == expected.gradient_accumulation_steps
    assert planned.recompute_layers == expected.recompute_layers
    assert f"micro-batch {expected.micro_batch}" in line
    # flex attention keeps no S x S scores: more fits than with eager attention
    flex, _ = plan_for_run(replace(cfg, attn_implementation="flex_attention"), card, LIGER)
    assert (flex.per_device_train_batch_size, -flex.recompute_layers) >= (planned.per_device_train_batch_size,
                                                                          -planned.recompute_layers)
    # Liger's patch did not take: planned conservatively (as materialised logits), the plan shrinks
    unfused, _ = plan_for_run(cfg, card, NO_LIGER)
    assert unfused.per_device_train_batch_size < planned.per_device_train_batch_size
    cpu = Device("cpu", "CPU", None, torch.float32, False, False)
    assert plan_for_run(cfg, cpu, NO_LIGER)[0] == cfg  # the CPU keeps the configured values


def test_the_planner_counts_the_optimizers_moments(capsys):
    """32-bit AdamW moments (optim adamw_torch_fused) cost 6 more bytes per LoRA parameter than 8-bit ones: the
    estimate grows by exactly that, and the recipe's plan counts the optimizer the config names."""
    g9 = KNOWN_ARCHS["google/gemma-2-9b"]
    eight = estimate_peak(g9, 8, 2048, 32, "hf", True, eager_attention=False, fp32_embeddings=False, recompute_layers=39)
    fused = estimate_peak(g9, 8, 2048, 32, "hf", True, eager_attention=False, fp32_embeddings=False, recompute_layers=39,
                          optim="adamw_torch_fused")
    assert fused.lora_gib - eight.lora_gib == pytest.approx(g9.lora_params(32) * 6 / 2**30, abs=0.01)
    assert 0.55 < fused.lora_gib - eight.lora_gib < 0.65  # 108M LoRA parameters at r=32
    assert fused.peak_gib > eight.peak_gib
    cfg = replace(PRESETS["gemma-9b"], attn_implementation="flex_attention")
    card = Device("cuda", "RTX 4090", 24.0, torch.bfloat16, True, False)
    peaks = [float(plan_for_run(replace(cfg, optim=o), card, LIGER)[1].split("predicted peak ")[1].split(" GiB")[0])
             for o in ("adamw_8bit", "adamw_torch_fused")]
    assert peaks[1] - peaks[0] == pytest.approx(0.6, abs=0.1)
    cli = []  # `make plan` previews either optimizer
    for extra in ([], ["--optim", "adamw_torch_fused"]):
        assert main(["--preset", "gemma-9b", "--gpu-mem", "24", "--json", *extra]) == 0
        cli.append(json.loads(capsys.readouterr().out)["predicted_peak_gib"])
    assert cli[1] - cli[0] == pytest.approx(0.6, abs=0.1)


def test_the_lm_head_is_ligers_where_liger_is_applied_on_cuda():
    """auto: Liger's fused cross-entropy on the labelled positions where Liger is applied on CUDA (measured faster),
    TRL's head elsewhere; by name, each is honoured, and liger on CUDA without Liger is refused with the fix."""
    from training.backends import UnslothBackend, resolve_lm_head

    assert [resolve_lm_head("auto", kind, applied)[0] for kind, applied in
            (("cuda", True), ("cuda", False), ("cpu", False), ("cpu", True))] == ["liger", "trl", "trl", "trl"]
    assert resolve_lm_head("trl", "cuda", True)[0] == "trl"
    assert resolve_lm_head("liger", "cpu", False)[0] == "liger"  # transformers' loss on the same positions
    with pytest.raises(BackendError, match="drop --set lm_head=liger"):
        resolve_lm_head("liger", "cuda", False, "liger-kernel is not installed")
    # the backend hands the resolved head to the trainer: never "auto"
    assert NO_LIGER.configure(replace(PRESETS["tiny"], lm_head="auto"), "cpu").lm_head == "trl"
    assert UnslothBackend("test").configure(replace(PRESETS["gemma-2b"], lm_head="liger"), "cuda").lm_head == "trl"


def test_ligers_rope_stays_on_its_triton_kernel_on_sm90_unless_the_user_chose():
    """On sm_90+ Liger 0.8 would dispatch RoPE to its CuTe DSL kernel, with which packed chat rows ran at ~0.6x on an
    H100: the recipe pins it to Triton's, keeps a user's own choice (for RoPE or for every op), and leaves older cards
    (Triton's only) alone."""
    from training.backends import pin_liger_triton

    env = {"PATH": "/bin"}
    assert pin_liger_triton((8, 9), env) == [] and env == {"PATH": "/bin"}  # an RTX 4090
    assert pin_liger_triton((9, 0), env) == ["rope"] and env["LIGER_KERNEL_IMPL_ROPE"] == "nvidia-triton"
    for chosen in ({"LIGER_KERNEL_IMPL_ROPE": "nvidia-cutedsl"}, {"LIGER_KERNEL_BACKEND_ROPE": "cutedsl"},
                   {"LIGER_KERNEL_IMPL": "cutedsl"}, {"LIGER_KERNEL_BACKEND": "cutedsl"}):  # BACKEND: Liger's legacy
        env = dict(chosen)
        assert pin_liger_triton((9, 0), env) == [] and env == chosen
    env = {}
    assert pin_liger_triton((12, 0), env) == ["rope"] and env == {"LIGER_KERNEL_IMPL_ROPE": "nvidia-triton"}


@pytest.fixture
def liger_patch(monkeypatch):
    """Liger's own patch function as a stand-in (Liger needs Triton, which has no CPU build here): the calls it got."""
    import sys
    import types

    calls = []
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {
        "gemma2": lambda rope=True, rms_norm=True, fused_linear_cross_entropy=True, geglu=True: calls.append(rope)}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    return calls


@pytest.mark.parametrize("card, cutlass, pinned", [
    ((9, 0), True, "nvidia-triton"),  # an H100 with FA4's nvidia-cutlass-dsl: Liger would pick CuTe DSL
    ((9, 0), False, None),  # no CuTe DSL to pick: nothing to pin, nothing claimed in the log
    ((8, 9), True, None),  # an RTX 4090
    ("hip", True, None),  # ROCm: Liger's NVIDIA kernels are not named there
])
def test_applying_liger_pins_its_rope_only_where_its_cute_kernel_could_run(monkeypatch, liger_patch, card, cutlass,
                                                                            pinned):
    """apply_liger on the recipe's path, with Liger's patch and the card's capability (the driver) as stand-ins; the
    pin is the real code."""
    import training.backends as b

    monkeypatch.setattr(b.os, "environ", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0) if card == "hip" else card)
    monkeypatch.setattr(torch.version, "hip", "6.2" if card == "hip" else None)
    installed = b._installed
    monkeypatch.setattr(b, "_installed", lambda module: cutlass if module == "cutlass" else installed(module))
    assert b.apply_liger("gemma2") and liger_patch == [True]
    assert b.os.environ.get("LIGER_KERNEL_IMPL_ROPE") == pinned
    assert not b.apply_liger("no-such-model")  # no kernels for it: not applied, said in the log


def test_ligers_warnings_for_other_hardwares_kernels_stay_out_of_the_log(monkeypatch, liger_patch, caplog):
    """On an H100 every row's log carried Liger's "Backend impl '..._ascend.rope' for op 'rope' could not be
    imported: ImportError: cannot import name 'tanh'" (seventh lease), though an Ascend kernel never runs there. Once
    Liger is applied that warning is dropped; a kernel that could run here failing to import still shows (with
    LIGER_KERNEL_IMPL_<OP> set it is the only cause Liger gives), as do Liger's other warnings."""
    import training.backends as b

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no pin: the environment stays as it is
    registry = logging.getLogger("liger_kernel.backends.registry")  # the logger Liger 0.8 warns on
    failure = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
    ascend = (failure, "liger_kernel.ops.backends._ascend.rope", "rope", "ImportError",
              "cannot import name 'tanh' from 'triton.language.math'")
    cute = (failure, "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError",
            "requires the NVIDIA CUTLASS Python DSL")
    other = ("_discover('rope'): all declared paths imported but no @register_op ran",)
    registry.removeFilter(b._LIGER_DISCOVERY_FILTER)  # as in a fresh process (an earlier test applied Liger)
    with caplog.at_level(logging.WARNING, logger=registry.name):
        registry.warning(*ascend)  # before Liger is applied: shown (the filter is the recipe's)
        assert b.apply_liger("gemma2")
        for warning in (ascend, cute, other):
            registry.warning(*warning)
    shown = [r.getMessage() for r in caplog.records if r.name == registry.name]
    assert shown == [w[0] % w[1:] if len(w) > 1 else w[0] for w in (ascend, cute, other)]


def test_backend_cpu_and_explicit_choices():
    assert choose_backend("auto", "cpu").name == "hf"
    assert choose_backend("hf", "cuda").name == "hf"
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        choose_backend("unsloth", "cpu")


def test_auto_is_the_project_path_and_unsloth_only_when_asked(monkeypatch):
    import training.backends as b

    monkeypatch.setattr(b, "_installed", lambda m: True)  # unsloth and Liger present
    called = []
    auto = choose_backend("auto", "cuda", "gemma2", self_check=lambda name: called.append(name) or (True, ""))
    assert auto.label == "hf+liger" and not called  # no unsloth self-check on the default path
    passed = choose_backend("unsloth", "cuda", "gemma2", self_check=lambda name: (True, "loss 6.2"))
    assert passed.name == "unsloth" and passed.label == "unsloth"
    with pytest.raises(BackendError, match="failed its self-check: boom"):
        choose_backend("unsloth", "cuda", "gemma2", self_check=lambda name: (False, "boom"))
    with pytest.raises(BackendError, match="phi3"):
        choose_backend("unsloth", "cuda", "phi3", self_check=lambda name: (True, ""))


def test_backend_missing_package_is_the_real_case_here():
    """unsloth is not installed on this machine: asking for it says how to get it."""
    with pytest.raises(BackendError, match=r"not installed.*\[fast\]"):
        choose_backend("unsloth", "cuda", "gemma2")


def test_a_failed_liger_patch_is_what_the_planner_sees(monkeypatch):
    """Liger installed but its patch does not take (here: a model type it has no kernels for, or no Liger at all):
    apply_backend reports it, and the plan is then sized for materialised logits."""
    import training.backends as b

    monkeypatch.setattr(b, "apply_liger", lambda model_type: False)
    choice = b.HFBackend(True, "the project's path: transformers + peft + Liger")
    applied = b.apply_backend(choice, "gemma2")
    assert applied.label == "hf" and "not applied" in applied.reason and not applied.fused_loss
    card = Device("cuda", "RTX 4090", 24.0, torch.bfloat16, True, False)
    unfused, _ = plan_for_run(PRESETS["gemma-2b"], card, applied)  # re-planned for the logits it now materialises
    assert unfused.per_device_train_batch_size < plan_for_run(PRESETS["gemma-2b"], card, choice)[0].per_device_train_batch_size
    monkeypatch.setattr(b, "apply_liger", lambda model_type: True)
    assert b.apply_backend(choice, "gemma2").label == "hf+liger"
    # the real function on this machine (no Liger installed): False, never an exception
    monkeypatch.undo()
    assert b.apply_liger("gemma2") is False


def test_unsloth_names_the_keys_it_ignores_and_unpacks(caplog):
    from training.backends import UnslothBackend

    cfg = replace(PRESETS["gemma-2b"], target_modules="q_proj,v_proj", bf16="false", packing=True)
    with caplog.at_level("WARNING", logger="training"):
        out = UnslothBackend("asked for").configure(cfg, "cuda")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "ignores target_modules=q_proj,v_proj" in warned and "ignores bf16=false" in warned
    assert "lora_r" not in warned  # honoured keys are not named
    assert not out.packing and out.target_modules == cfg.target_modules
    for head, named in (("auto", False), ("trl", False), ("liger", True)):  # unsloth trains with TRL's head
        caplog.clear()
        with caplog.at_level("WARNING", logger="training"):
            assert UnslothBackend("asked for").configure(replace(cfg, lm_head=head), "cuda").lm_head == "trl"
        assert ("ignores lm_head=liger (it uses trl)" in caplog.text) == named, caplog.text


def test_several_processes_refuse_a_single_gpu_backend_before_any_self_check():
    from training.backends import select_backend

    with pytest.raises(BackendError, match="one GPU only.*backend=auto"):
        select_backend("unsloth", "cuda", "gemma2", processes=2)
    assert select_backend("auto", "cpu", "gemma2", processes=2).multi_gpu


def test_attention_choice(monkeypatch):
    fake_card(monkeypatch, (8, 9), "NVIDIA GeForce RTX 4090")  # the reference card: flex, wherever the test runs
    assert b_resolve("auto", "cpu")[0] == "eager"
    assert b_resolve("auto", "cuda", lambda name: (True, "ok"))[0] == "flex_attention"
    impl, why = b_resolve("auto", "cuda", lambda name: (False, "No valid triton configs"))
    assert impl == "eager" and "No valid triton configs" in why
    assert b_resolve("sdpa", "cuda")[0] == "sdpa"


def fake_card(monkeypatch, capability, name, fa4_installed=True):
    """What only an NVIDIA driver can say (the card's compute capability and name), and whether flash-attn-4's
    distribution is installed; the FA4 choice itself runs on the device (scripts/device/explore_fa4.py)."""
    import importlib.metadata as md

    import torch

    real_version = md.version

    def version(dist):
        if dist == "flash-attn-4":
            if not fa4_installed:
                raise md.PackageNotFoundError(dist)
            return "4.0.0b40"
        return real_version(dist)

    monkeypatch.setattr(md, "version", version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_auto_tries_fa4_first_on_hopper_then_flex_and_fa4_by_name_after_its_self_check(monkeypatch, tmp_path):
    """auto on a Hopper card with flash-attn-4: FA4 after its self-check; where that check fails, flex after its own,
    and the log line says why not FA4. By name FA4 runs after its self-check too; its kernels are cached on disk."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("FLASH_ATTENTION")})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake_card(monkeypatch, (9, 0), "NVIDIA H200")
    asked = []
    impl, why = b_resolve("auto", "cuda", lambda name: (asked.append(name) or True, "ok"))
    assert impl == "flash_attention_4" and asked == ["fa4"] and "FlashAttention 4 passed" in why
    # its compiled kernels are kept on disk for the run and the next ones
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"].startswith(str(tmp_path))
    impl, why = b_resolve("auto", "cuda", lambda name: (asked.append(name) or name != "fa4", "grad error 0.9"))
    assert impl == "flex_attention" and asked == ["fa4", "fa4", "flex"]
    assert "not FlashAttention 4: its self-check failed (fa4: grad error 0.9)" in why
    impl, why = b_resolve("flash_attention_4", "cuda", lambda name: (asked.append(name) or True, "ok"))
    assert impl == "flash_attention_4" and asked[-1] == "fa4" and "passed its self-check" in why
    impl, why = b_resolve("auto", "cuda", lambda name: (False, f"{name} failed"))  # nothing passes: eager, and why
    assert impl == "eager" and "flex failed" in why and "not FlashAttention 4: its self-check failed (fa4: fa4 failed)" in why


@pytest.mark.parametrize("capability,name,installed,reason", [
    ((8, 9), "NVIDIA GeForce RTX 4090", True, "compute capability 8.9"),  # the reference card: flex
    ((12, 0), "NVIDIA GeForce RTX 5090", True, "compute capability 12.0"),  # no soft-cap backward
    ((9, 0), "NVIDIA H100", False, "flash-attn-4 is not installed"),
])
def test_fa4_by_name_is_refused_where_it_cannot_train(monkeypatch, capability, name, installed,
                                                                             reason):
    fake_card(monkeypatch, capability, name, installed)
    asked = []
    impl, why = b_resolve("auto", "cuda", lambda n: (asked.append(n) or True, "ok"))
    assert impl == "flex_attention" and asked == ["flex"]
    with pytest.raises(BackendError, match=f"flash_attention_4 cannot train here.*{reason}.*attn_implementation=auto"):
        b_resolve("flash_attention_4", "cuda", lambda n: asked.append(n))
    assert asked == ["flex"]  # refused before FA4's self-check


def test_a_sliding_window_that_can_bind_gets_fa4s_windowed_kernel_checked(monkeypatch):
    """Samples longer than the model's window (Gemma-2 past 4096 tokens, Gemma-3's local layers): FA4 runs its
    windowed kernel, so that is the check it must pass ("fa4-window"), by name and under auto; where it fails, auto
    falls back to flex and says why. Samples within the window: the plain kernel's check ("fa4")."""
    fake_card(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    asked = []
    impl, why = b_resolve("auto", "cuda", lambda n: (asked.append(n) or True, "ok"), window_binds=4096)
    assert impl == "flash_attention_4" and asked == ["fa4-window"]
    impl, _ = b_resolve("flash_attention_4", "cuda", lambda n: (asked.append(n) or True, "ok"), window_binds=4096)
    assert impl == "flash_attention_4" and asked[-1] == "fa4-window"
    impl, why = b_resolve("auto", "cuda", lambda n: (asked.append(n) or n == "flex", "window off"), window_binds=4096)
    assert impl == "flex_attention" and asked[-2:] == ["fa4-window", "flex"]
    assert "self-check failed (fa4-window: window off)" in why
    # by name, the refusal names the check and both fixes: auto, or samples the window cannot outgrow
    with pytest.raises(BackendError, match="failed its self-check \\(fa4-window\\).*window off.*attn_implementation=auto"
                                           ".*max_seq_length=4096"):
        b_resolve("flash_attention_4", "cuda", lambda n: (asked.append(n) or False, "window off"), window_binds=4096)
    b_resolve("auto", "cuda", lambda n: (asked.append(n) or True, "ok"))
    assert asked[-1] == "fa4"


def test_the_fa4_checks_are_cached_apart(monkeypatch, tmp_path):
    """A cached pass of the plain kernel's check must not stand for the windowed kernel's: each is run on its own,
    and each pass then serves the next run."""
    import torch

    import training.backends as backends

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    ran = []
    monkeypatch.setattr(backends, "_run_self_check_subprocess", lambda name, shape: (ran.append(name) or True,
                                                                                       f"{name} ok"))
    assert backends.run_self_check("fa4") == (True, "fa4 ok")
    assert backends.run_self_check("fa4-window") == (True, "fa4-window ok")
    assert backends.run_self_check("fa4-window") == (True, "fa4-window ok (cached)")
    assert backends.run_self_check("fa4") == (True, "fa4 ok (cached)")
    assert ran == ["fa4", "fa4-window"]
    checks = backends.ATTENTION_SELF_CHECKS
    assert checks["fa4"][0] == checks["fa4-window"][0] == "flash_attention_4"
    assert checks["fa4-window"][1] < 256 <= checks["fa4"][1]  # binds / cannot bind on the check's samples (<= 256)


def test_an_attention_asked_for_by_name_on_a_gpu_must_pass_its_self_check(monkeypatch):
    """FA4 or flex by name: the same self-check as auto's choice; a failure is refused with the check's own detail and
    the fix, a pass says so. sdpa/eager by name are not checked; on the CPU nothing is."""
    fake_card(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    asked = []
    bad = "loss 6.3047 vs eager 6.2874, input-gradient error 9.43e-01"
    with pytest.raises(BackendError, match=f"flash_attention_4 failed its self-check.*{bad}.*attn_implementation=auto"):
        b_resolve("flash_attention_4", "cuda", lambda n: (asked.append(n) or False, bad))
    impl, why = b_resolve("flex_attention", "cuda", lambda n: (asked.append(n) or True, "grad error 1e-2"))
    assert impl == "flex_attention" and "passed its self-check (flex: grad error 1e-2)" in why
    assert b_resolve("eager", "cuda", lambda n: asked.append(n))[0] == "eager"
    assert b_resolve("flex_attention", "cpu", lambda n: asked.append(n))[0] == "flex_attention"
    assert asked == ["fa4", "flex"]


def test_the_attention_self_check_catches_samples_attending_across_their_boundaries():
    """The self-check the recipe runs before trusting FA4 or flex, on the CPU with attentions registered in
    transformers: one that computes eager's attention passes; one that lets packed samples attend to each other (a
    plain causal mask over the row, the signature of FA4's failure on the H100) fails, window binding or not; one that
    drops the causal mask fails."""
    import torch
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from training.backends import _attention_self_check

    def exact(module, q, k, v, attention_mask, **kw):
        return eager_attention_forward(module, q, k, v, attention_mask, **kw)

    def across_samples(module, q, k, v, attention_mask, **kw):
        causal = torch.full((q.shape[2],) * 2, float("-inf"), dtype=q.dtype).triu(1)[None, None]
        return eager_attention_forward(module, q, k, v, causal, **kw)

    def not_causal(module, q, k, v, attention_mask, **kw):
        return eager_attention_forward(module, q, k, v, None, **kw)

    for name, fn in (("test_exact", exact), ("test_across", across_samples), ("test_not_causal", not_causal)):
        register_attention(name, fn)
    for window in (64, 256):  # binding (samples up to 256 tokens) and not
        assert _attention_self_check("test_exact", window, device="cpu")["ok"]
        assert not _attention_self_check("test_across", window, device="cpu")["ok"]
        assert not _attention_self_check("test_not_causal", window, device="cpu")["ok"]
    assert _attention_self_check("test_exact", 64, device="cpu", boundaries=False)["ok"]
    # built with another model's attention (SmolLM2's: head_dim 64, 3 heads per kv head, no soft-cap): the same verdicts
    llama = AttentionShape(head_dim=64, group=3, softcap=None)
    assert _attention_self_check("test_exact", 256, device="cpu", shape=llama)["ok"]
    assert not _attention_self_check("test_across", 256, device="cpu", shape=llama)["ok"]


@pytest.mark.parametrize("shape", [AttentionShape(), AttentionShape(head_dim=64, group=3, softcap=None),
                                   AttentionShape(head_dim=128, group=4, softcap=30.0)])
def test_the_attention_check_calls_the_kernel_with_the_runs_shape(shape):
    """What the attention under check is handed: the run's head size and query heads per key/value head, the scale
    1/sqrt(head_dim), its soft-cap or none, a window on the windowed layer only; Gemma-2's default is the check as it
    was before it carried shapes (its config, and so its reference losses on the H100, unchanged)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from training.backends import _attention_self_check

    seen, hidden = [], set()

    def recording(module, q, k, v, attention_mask, **kw):
        hidden.add(module.config.hidden_size)
        seen.append((tuple(q.shape), tuple(k.shape), kw.get("scaling"), kw.get("softcap"), kw.get("sliding_window")))
        return eager_attention_forward(module, q, k, v, attention_mask, **kw)

    register_attention("test_recording", recording)
    result = _attention_self_check("test_recording", 64, device="cpu", shape=shape)
    assert result["ok"] and shape.variant in result["detail"]
    d, g = shape.head_dim, shape.group
    assert set(seen) == {((1, g, 512, d), (1, 1, 512, d), d ** -0.5, shape.softcap, 64),
                         ((1, g, 512, d), (1, 1, 512, d), d ** -0.5, shape.softcap, None)}
    if shape == AttentionShape():  # the check's model before shapes: hidden 256, heads 2/1, head_dim 256, soft-cap 50
        assert hidden == {256} and (g, d, shape.softcap) == (2, 256, 50.0)


def test_the_self_checks_reference_keeps_packed_samples_apart():
    """The reference the self-check compares against is eager attention over each packed sample alone: an attention
    written here from the samples' lengths (causal within each sample, soft-capped as eager does) passes, with and
    without the collator's boundaries, and with a window that cannot bind. Before check v5 the reference attended
    across the samples (the check's model kept its KV cache, and with one transformers builds no per-sample mask),
    so this attention failed, as FA4 did on the H100."""
    from training.backends import _attention_self_check

    register_attention("test_per_sample", per_sample_attention(window=None))  # 256 tokens: cannot bind anyway
    for boundaries in (True, False):
        result = _attention_self_check("test_per_sample", 256, device="cpu", boundaries=boundaries)
        assert result["ok"], result["detail"]


@pytest.mark.parametrize("window,ok", [(64, True), (None, False), (72, False), (56, False)])
def test_the_windowed_check_catches_a_wrong_window(window, ok):
    """The fa4-window check (a 64-token window that binds on samples of up to 256): an attention written here from
    the samples' lengths, causal within each sample and seeing the last `window` tokens, passes with the model's
    window and fails with none or one 8 tokens off. The loss alone would not tell (no window: 6.3040 against 6.3026);
    the input gradients do."""
    from training.backends import ATTENTION_SELF_CHECKS, _attention_self_check

    name = f"test_window_{window}"
    register_attention(name, per_sample_attention(window))
    result = _attention_self_check(name, ATTENTION_SELF_CHECKS["fa4-window"][1], device="cpu")
    assert result["ok"] == ok, result["detail"]


def test_configure_checks_the_fa4_kernel_the_window_calls_for(monkeypatch):
    """FA4 by name: max_seq_length == the window, no sample outgrows it: the plain kernel's check; one token more and
    the window can bind: the windowed kernel's check (the recipe's prepare() passes the base model's window); a model
    without a window (Llama) has nothing to bind."""
    import training.backends as backends

    fake_card(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(os, "environ", dict(os.environ))  # FA4's kernel-cache variables stay in this test
    asked = []
    monkeypatch.setattr(backends, "run_self_check", lambda name, shape: (asked.append((name, shape)) or True, "ok"))
    cfg = replace(PRESETS["gemma-2b"], max_seq_length=4096, attn_implementation="flash_attention_4")
    longer = replace(cfg, max_seq_length=4097)
    llama = AttentionShape(head_dim=64, group=3, softcap=None, sliding_window=None)
    gemma = AttentionShape(sliding_window=4096)
    for c, shape in ((cfg, gemma), (longer, gemma), (longer, llama)):
        assert HFBackend(False, "test").configure(c, "cuda", shape).attn_implementation == "flash_attention_4"
    # the check for the kernel the window calls for, built with the model's own attention shape
    assert asked == [("fa4", gemma), ("fa4-window", gemma), ("fa4", llama)]


def test_attention_shape_of_reads_the_config(tmp_path, tiny_model_dir):
    """What the attention self-checks are built with: the base model's head size, grouping, soft-cap and window."""
    from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig, Qwen2Config

    from training.model import attention_shape_of, load_base_config

    tiny = json.loads((tiny_model_dir / "config.json").read_text())
    assert attention_shape_of(load_base_config(str(tiny_model_dir))) == AttentionShape(
        head_dim=tiny["head_dim"], group=tiny["num_attention_heads"] // tiny["num_key_value_heads"],
        softcap=tiny["attn_logit_softcapping"], sliding_window=tiny["sliding_window"])
    # SmolLM2-135M's shape: head_dim 576 / 9 heads, no soft-cap, no window
    LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3).save_pretrained(tmp_path / "llama")
    assert attention_shape_of(load_base_config(str(tmp_path / "llama"))) == AttentionShape(64, 3, None, None)
    # Qwen2's config has no head_dim at all: hidden size over heads (Qwen2.5-0.5B: 896 / 14, 2 kv heads)
    Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2).save_pretrained(tmp_path / "qwen")
    assert "head_dim" not in json.loads((tmp_path / "qwen" / "config.json").read_text())
    assert attention_shape_of(load_base_config(str(tmp_path / "qwen"))) == AttentionShape(64, 7, None, None)
    Gemma3Config(text_config=Gemma3TextConfig(head_dim=128, num_attention_heads=8, num_key_value_heads=4,
                                              sliding_window=512).to_dict()).save_pretrained(tmp_path / "gemma3")
    assert attention_shape_of(load_base_config(str(tmp_path / "gemma3"))) == AttentionShape(128, 2, None, 512)


def test_the_self_check_subprocess_gets_the_runs_attention_shape(monkeypatch, tmp_path):
    """The shape travels on the self-check's command line and comes back out of its parser; verdicts are cached per
    kernel variant, so Gemma-2's pass does not stand for a Llama's."""
    import training.backends as backends

    llama = AttentionShape(head_dim=64, group=3, softcap=None)
    for backend, shape in (("fa4", llama), ("flex", AttentionShape()), ("fa4-window", None)):
        seen = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(backends, "self_check_step", lambda name, s: seen.append((name, s)) or {"ok": True,
                                                                                                   "detail": "ok"})
        cmd = backends.self_check_command(backend, shape) if shape else backends.self_check_command(backend)
        assert backends.main(cmd[3:]) == 0
        assert seen == [(backend, shape or AttentionShape())]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    ran = []
    monkeypatch.setattr(backends, "_run_self_check_subprocess", lambda name, s: (ran.append((name, s)) or True, "ok"))
    for _ in range(2):
        assert backends.run_self_check("fa4", AttentionShape())[0] and backends.run_self_check("fa4", llama)[0]
    assert ran == [("fa4", AttentionShape()), ("fa4", llama)]  # each checked once, then cached


def test_fa4_drops_only_a_window_its_samples_cannot_outgrow(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training.backends import drop_unbinding_window
    from training.model import load_base_config, sliding_window_of

    window = sliding_window_of(load_base_config(str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    windowed = [m for m in model.modules() if getattr(m, "sliding_window", None)]
    assert window and windowed  # Gemma-2 alternates windowed and global layers
    assert drop_unbinding_window(model, window + 1) == 0  # it can bind: kept, FA4's windowed kernel runs
    assert all(m.sliding_window == window for m in windowed)
    assert drop_unbinding_window(model, window) == len(windowed)
    assert not any(getattr(m, "sliding_window", None) for m in model.modules())


def test_sliding_window_of_reads_the_config(tmp_path, tiny_model_dir):
    from transformers import Gemma3Config, Gemma3TextConfig, Qwen2Config

    from training.model import ModelLoadError, load_base_config, sliding_window_of

    def window(path):  # what prepare() does: the base model's config, read once, then its window
        return sliding_window_of(load_base_config(str(path)))

    assert window(tiny_model_dir) == json.loads((tiny_model_dir / "config.json").read_text())["sliding_window"]
    Qwen2Config(sliding_window=4096, use_sliding_window=False).save_pretrained(tmp_path / "qwen")
    assert window(tmp_path / "qwen") is None  # named, not used
    Gemma3Config(text_config=Gemma3TextConfig(sliding_window=512).to_dict()).save_pretrained(tmp_path / "gemma3")
    assert window(tmp_path / "gemma3") == 512  # a multimodal model's window is its text config's
    with pytest.raises(ModelLoadError, match="does not exist"):  # a missing model stops before any window is read
        window(tmp_path / "missing")


def register_attention(name: str, fn) -> None:
    """An attention under a name transformers resolves (attn_implementation=name), with eager's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def per_sample_attention(window: int | None, lengths=(100, 156, 256)):
    """Eager attention with a mask written here from the self-check's packed row (its samples' lengths): causal
    within each sample, and on a windowed layer the last `window` tokens only (None: no window anywhere)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    def attention(module, q, k, v, attention_mask, **kw):
        sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        pos = torch.arange(q.shape[2])
        keep = (sample[:, None] == sample[None, :]) & (pos[:, None] >= pos[None, :])
        if kw.pop("sliding_window", None) and window:  # the global layer has none
            keep &= pos[:, None] - pos[None, :] < window
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))[None, None]
        return eager_attention_forward(module, q, k, v, mask, **kw)
    return attention


def b_resolve(requested, kind, check=None, window_binds=None):
    from training.backends import resolve_attention

    return resolve_attention(requested, kind, self_check=check, window_binds=window_binds)


def test_planner_keeps_layers_when_memory_allows():
    """Per-layer checkpointing: on a 24 GiB plan of Gemma-2-2B (bf16 path, flex attention) the micro-batch is the
    largest with every layer recomputed, then some layers keep their activations; on a big card none recompute."""
    g2 = KNOWN_ARCHS["google/gemma-2-2b"]
    p24 = plan(g2, 16, 2048, 32, 24, "hf", eager_attention=False, fp32_embeddings=False)
    assert p24.gradient_checkpointing and 0 < p24.recompute_layers < g2.num_layers
    assert p24.predicted_peak_gib <= budget_gib(24)
    one_more_kept = estimate_peak(g2, p24.micro_batch, 2048, 32, "hf", True, eager_attention=False,
                                  fp32_embeddings=False, recompute_layers=p24.recompute_layers - 1)
    assert one_more_kept.peak_gib > budget_gib(24)
    big = plan(g2, 16, 2048, 32, 141, "hf", eager_attention=False, fp32_embeddings=False)
    assert big.micro_batch == 16 and not big.gradient_checkpointing and big.recompute_layers == 0


def test_bf16_estimates_match_the_h200_measurements_within_15_percent():
    """The project's bf16 path on the H200, 2026-12-02 (docs/benchmarks.md): flex and eager, without checkpointing,
    with every layer recomputed, with 2 of 26 layers kept (which cost nearly nothing: 12.25 -> 12.55 GiB), and with 5
    kept (the 24 GiB plan before the refit: 20.90 GiB, second lease)."""
    g2 = KNOWN_ARCHS["google/gemma-2-2b"]
    cases = [(8, None, False, 43.46), (16, None, False, 79.39), (16, 26, False, 12.25), (16, 24, False, 12.55), (16, 21, False, 20.90),
             (8, None, True, 97.88)]
    for bs, recompute, eager, measured in cases:
        est = estimate_peak(g2, bs, 2048, 32, "hf", recompute is not None, eager_attention=eager,
                            fp32_embeddings=False, recompute_layers=recompute).peak_gib
        assert abs(est / measured - 1) < 0.15, (bs, recompute, eager, est, measured)


def test_self_check_subprocess_fails_cleanly_without_cuda():
    ok, detail = _run_self_check_subprocess("unsloth")
    assert ok is False and detail == "no CUDA GPU visible"  # the verdict's own words reach the log
