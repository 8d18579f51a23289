"""The project's fast path on the real 4-bit layers (bitsandbytes NF4 on the CPU): the fused LoRA function computes
what peft computes, forward and backward; per-layer checkpointing keeps exactly the layers it says; the frozen
norms and embeddings keep the compute dtype unless the fp32 upcast is asked for. (Its speed: docs/benchmarks.md.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from training import fast_lora
from training.backends import load_hf
from training.device import Device
from training.qlora_config import PRESETS

CPU = Device("cpu", "CPU", None, torch.float32, False, False)


def load(tiny_model_dir, **overrides):
    torch.manual_seed(0)  # LoRA A starts random: the same for every load
    model = load_hf(replace(PRESETS["tiny"], **overrides), str(tiny_model_dir), CPU)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter's contribution and A's gradient non-zero
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_grads(plain_loss, plain, fused_loss, fused) -> None:
    """The fused path's loss and LoRA gradients are peft's (A and B of the 14 LoRA layers), none of them zero."""
    assert plain.keys() == fused.keys() and len(plain) == 28
    assert abs(fused_loss - plain_loss) < 1e-6
    for name in plain:
        assert torch.allclose(fused[name], plain[name], rtol=1e-4, atol=1e-7), name
        assert fused[name].abs().sum() > 0, name


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("grouped, base_first, recompute_act", [(True, False, True), (True, False, False),
                                                                 (False, False, True), (False, True, True)],
                         ids=["grouped", "keep-act", "per-layer", "base-first"])
def test_fused_lora_equals_peft_forward_and_backward(tiny_model_dir, ids, grouped, base_first, recompute_act,
                                                     monkeypatch):
    monkeypatch.setattr(fast_lora, "GROUPED", grouped)  # the default, and the benchmark's -nogroup and -basefirst
    monkeypatch.setattr(fast_lora, "BASE_FIRST", base_first)
    monkeypatch.setattr(fast_lora, "RECOMPUTE_ACT", recompute_act)  # and -keepact
    plain_loss, plain = loss_and_grads(load(tiny_model_dir, fused_lora=False), ids)
    fused_model = load(tiny_model_dir, fused_lora=True)
    fused_loss, fused = loss_and_grads(fused_model, ids)
    assert_same_loss_and_grads(plain_loss, plain, fused_loss, fused)
    # states the fused path does not compute fall back to peft's own forward: the base alone, adapters off, as an
    # evaluation runs it (eval mode, no grad: on a CPU with AVX512-BF16 bitsandbytes then repacks the 4-bit weights
    # in place for its own kernel, which the fused path must not read as NF4 afterwards)
    with torch.no_grad():
        adapted = fused_model(input_ids=ids).logits
        with fused_model.disable_adapter():
            base_fused = fused_model.eval()(input_ids=ids).logits
        # (bitsandbytes' kernel for repacked weights computes in bf16: 0.004 off here; read as NF4 they were 0.8 off)
        assert torch.allclose(fused_model.train()(input_ids=ids).logits, adapted, atol=0.02)
    reference = load(tiny_model_dir, fused_lora=False)
    with torch.no_grad():
        with reference.disable_adapter():
            base_plain = reference.eval()(input_ids=ids).logits
    assert torch.allclose(base_fused, base_plain, atol=1e-6)


@pytest.mark.parametrize("base_first", [False, True], ids=["adapter-first", "base-first"])
def test_the_big_matmul_accumulates_onto_the_small_one(tiny_model_dir, ids, base_first, monkeypatch):
    """By default each in-place accumulation (forward: base onto the adapter's product; backward: dY W onto
    (dY B) A) is the matmul with the wide inner dimension: the rank-r product, bound by memory, is written once and
    never read and rewritten. BASE_FIRST (exploratory) accumulates the rank-r products instead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(fast_lora, "BASE_FIRST", base_first)
    model = load(tiny_model_dir, fused_lora=True, gradient_checkpointing=False)  # no recompute: one forward
    r = PRESETS["tiny"].lora_r
    inner: list[int] = []

    class Accumulations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.addmm_.default:
                inner.append(args[1].shape[1])  # addmm_(self, mat1, mat2): mat1's columns
            return func(*args, **(kwargs or {}))

    with Accumulations():
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(inner) == 2 * 14  # one in the forward, one in the backward, per LoRA layer
    assert all(k == r for k in inner) if base_first else all(k > r for k in inner), inner


def test_grouped_siblings_read_their_input_once_and_share_one_input_gradient(tiny_model_dir, ids, monkeypatch):
    """q, k and v (and gate and up) run as one function: one product of their shared input with all their adapters
    in the forward (width R = 3r, 2r), and one input gradient that each member's matmuls accumulate onto, so
    autograd sums 3 fewer (tokens x hidden) gradients per layer (2 for q/k/v, 1 for gate/up). Per layer
    (-nogroup) neither holds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    r = PRESETS["tiny"].lora_r  # 8: no base product of the tiny model is this narrow (its narrowest is 32 wide)

    def ops(grouped: bool) -> tuple[list[int], int]:
        monkeypatch.setattr(fast_lora, "GROUPED", grouped)
        model = load(tiny_model_dir, fused_lora=True, gradient_checkpointing=False)
        hidden = model.config.hidden_size
        widths, sums, backward = [], 0, False

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                nonlocal sums
                out = func(*args, **(kwargs or {}))
                if not backward and func is torch.ops.aten.mm.default and args[1].shape[0] == hidden and \
                        out.shape[1] <= 3 * r:
                    widths.append(out.shape[1])  # x A^T: a layer's input read by its adapters
                if backward and func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and \
                        out.shape[-1] == hidden:
                    sums += 1  # autograd's sums of (tokens x hidden) gradients
                return out

        with Ops():
            loss = model(input_ids=ids, labels=ids).loss
            backward = True
            loss.backward()
        return sorted(widths), sums

    layers = 2  # the tiny model's decoder layers; o_proj's input is hidden-wide too, down_proj's is not
    grouped_widths, grouped_sums = ops(True)
    per_layer_widths, per_layer_sums = ops(False)
    assert grouped_widths == sorted([3 * r, r, 2 * r] * layers)  # q+k+v, o, gate+up
    assert per_layer_widths == [r] * 6 * layers  # q, k, v, o, gate, up
    assert per_layer_sums - grouped_sums == 3 * layers, (per_layer_sums, grouped_sums)


def test_a_group_member_whose_output_takes_no_part_gets_no_gradient(tiny_model_dir):
    """As autograd gives three separate layers: only k's output in the loss, so only k's A and B get gradients."""
    model = load(tiny_model_dir, fused_lora=True)
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 5, attn.q_proj.in_features, generator=torch.Generator().manual_seed(3), requires_grad=True)
    outs = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    outs[1].square().sum().backward()
    grads = {n: (p.grad is not None) for n, p in attn.named_parameters() if "lora_" in n and "_proj" in n
             and n.split(".")[0] in ("q_proj", "k_proj", "v_proj")}
    assert grads and all(has == name.startswith("k_proj") for name, has in grads.items()), grads
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_grouped_member_called_on_another_input_computes_its_own_output(tiny_model_dir, caplog):
    """The group hands a member the output it computed only for the very tensor it was called on: q(x), k(y), v(x)
    give what three separate layers give. A model that calls its siblings that way (cross-attention) gets a warning
    and its members run one by one from then on, keeping nothing."""
    grouped = load(tiny_model_dir, fused_lora=True)
    attn = grouped.base_model.model.model.layers[0].self_attn
    group = attn.q_proj._group[0]
    x, y = torch.randn(2, 1, 5, attn.q_proj.in_features, generator=torch.Generator().manual_seed(2)).unbind(0)
    with torch.no_grad():
        got = attn.q_proj(x), attn.k_proj(y), attn.v_proj(x), attn.k_proj(x)
        want = tuple(fast_lora._layer_forward(layer, t) for layer, t in
                     ((attn.q_proj, x), (attn.k_proj, y), (attn.v_proj, x), (attn.k_proj, x)))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
    assert not group.enabled and group.pending is None
    assert [r.getMessage() for r in caplog.records if "not all called on one input" in r.getMessage()] == [
        "fused LoRA: q_proj, k_proj, v_proj of Gemma2Attention were not all called on one input (what one computed "
        "for the others went unused); they run one by one from now on"]
    # the model's own calls (q, k, v on one tensor) keep the others grouped, warn nothing and keep nothing
    caplog.clear()
    grouped(input_ids=torch.randint(3, 500, (1, 8))).logits.sum().backward()
    others = {id(m._group[0]): m._group[0] for m in grouped.modules()
              if getattr(m, "_group", None) and m._group[0] is not group}.values()
    assert len(others) == 3 and all(g.enabled and g.pending is None for g in others)
    assert not [r for r in caplog.records if "not all called" in r.getMessage()]


def test_per_layer_checkpointing_keeps_what_it_says(tiny_model_dir, ids):
    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return total

    def flags(model):
        return [m.gradient_checkpointing for m in model.modules() if type(m).__name__ == "Gemma2DecoderLayer"]

    every = load(tiny_model_dir, gradient_checkpointing=True, recompute_layers=-1)
    one = load(tiny_model_dir, gradient_checkpointing=True, recompute_layers=1)
    none = load(tiny_model_dir, gradient_checkpointing=False)
    assert (flags(every), flags(one), flags(none)) == ([True, True], [True, False], [False, False])
    assert saved_bytes(every) < saved_bytes(one) < saved_bytes(none)


def test_frozen_norms_keep_the_compute_dtype_unless_upcast(tiny_model_dir):
    bf16 = Device("cpu", "CPU", None, torch.bfloat16, True, False)
    lean = load_hf(replace(PRESETS["tiny"]), str(tiny_model_dir), bf16)
    upcast = load_hf(replace(PRESETS["tiny"], fp32_norms_and_embeddings=True), str(tiny_model_dir), bf16)

    def dtypes(model, part):
        return {p.dtype for n, p in model.named_parameters() if part in n and not p.requires_grad}

    assert dtypes(lean, "norm") == {torch.bfloat16} and dtypes(lean, "embed_tokens") == {torch.bfloat16}
    assert dtypes(upcast, "norm") == {torch.float32} and dtypes(upcast, "embed_tokens") == {torch.float32}
    assert not any(p.requires_grad for n, p in lean.named_parameters() if "lora_" not in n)


def test_fp8_backward_keeps_the_forward_exact_and_the_gradients_close(tiny_model_dir, ids):
    """fp8_backward: the input gradient's product with the base weight through torch._scaled_mm (e4m3, per-row
    scales; emulated on the CPU). The loss is the exact path's to the bit (the forward is untouched); every LoRA
    gradient stays close to the exact one yet differs from it (the FP8 product really ran); and a row with an outlier
    keeps the other rows their precision (scales per row, not per tensor)."""
    from training.fast_lora import E4M3_MAX, fp8_matmul, quantize_rows

    exact_loss, exact = loss_and_grads(load(tiny_model_dir, fused_lora=True), ids)
    fp8_loss, fp8 = loss_and_grads(load(tiny_model_dir, fused_lora=True, fp8_backward=True), ids)
    assert fp8_loss == exact_loss
    for name in exact:
        cos = torch.nn.functional.cosine_similarity(fp8[name].flatten(), exact[name].flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))  # FP8 e4m3: ~6% relative rounding per operand
    # layer 1's gradients reach layer 0 through FP8 input gradients: they differ (the last layer's B does not)
    assert sum(not torch.equal(fp8[n], exact[n]) for n in exact) >= len(exact) // 2

    t = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    t[0, 0] = 1e6  # an outlier in row 0 only: under one scale per tensor, rows 1-3 would flush to zero
    t8, scale = quantize_rows(t)
    assert t8.dtype == torch.float8_e4m3fn and scale.shape == (4, 1)
    assert float(t8.float().abs().max()) <= E4M3_MAX
    back = t8.float() * scale
    assert float((back[1:] - t[1:]).norm() / t[1:].norm()) < 0.05  # row 0's outlier left rows 1-3 their precision
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    ref = t[1:] @ w.t()
    assert float((fp8_matmul(t[1:], w, torch.float32) - ref).norm() / ref.norm()) < 0.05


def test_fp8_backward_needs_the_fused_function_and_fp8_tensor_cores():
    from training.fast_lora import fp8_supported
    from training.qlora_config import ConfigError, validate

    with pytest.raises(ConfigError, match="fused_lora=true"):
        validate(replace(PRESETS["tiny"], fp8_backward=True, fused_lora=False), "tiny")
    assert [fp8_supported(c) for c in ((8, 6), (8, 9), (9, 0), (12, 0), None)] == [False, True, True, True, True]


def test_lm_head_on_labelled_positions_equals_trls_fused_head(tiny_model_dir):
    """lm_head=liger computes the loss only at labelled positions (here through transformers' own loss, as on a CPU
    without Liger): the same loss and the same LoRA gradients as TRL's fused head, which SFTTrainer trains with,
    with and without num_items_in_batch (the step's labelled tokens), on rows whose prompts carry no labels."""
    from trl.trainer.utils import add_fused_lm_head

    from training.lm_head import labelled_positions_loss

    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :20], labels[1, :5], labels[1, 40:] = -100, -100, -100  # prompts and padding: no loss
    inputs = {"input_ids": ids, "labels": labels}
    for items in (None, 150):
        model = load(tiny_model_dir, fused_lora=True)
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        ref = model(**inputs, fused_lm_head=True, num_items_in_batch=items).loss
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        loss, _ = labelled_positions_loss(model, inputs, items)
        loss.backward()
        assert abs(float(loss) - float(ref)) < 1e-5 * float(ref), (float(loss), float(ref))
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, ref_grads[name], rtol=1e-4, atol=1e-7), name


def test_ligers_head_logs_the_token_accuracy_that_ligers_forward_returns(tiny_model_dir, tiny_tokenizer, tmp_path):
    """With Liger's head on CUDA the trainer asks Liger's forward for the labelled positions' top-1 accuracy and logs
    it as SFTTrainer's `mean_token_accuracy`. Liger's forward cannot run on a CPU: a stand-in computes the same
    thing from transformers' logits on the kept positions. Without the flag (the CPU) nothing extra is asked. The
    tokens seen are counted either way (`num_tokens`), as SFTTrainer counts them."""
    from datasets import Dataset
    from trl import SFTConfig

    from training.lm_head import trainer_class

    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :20], labels[1, :5] = -100, -100  # prompts: no loss
    for token_accuracy in (True, False):
        model = load(tiny_model_dir, fused_lora=True)
        base = model.get_base_model()
        real_forward, asked, expected = base.forward, [], []

        def liger_like_forward(*args, return_token_accuracy=False, **kwargs):  # Liger's lce_forward's contract
            asked.append(return_token_accuracy)
            out = real_forward(*args, **kwargs)
            if return_token_accuracy:
                target = kwargs["shift_labels"]
                mask = target != -100
                out["token_accuracy"] = (out.logits.argmax(-1)[mask] == target[mask]).float().mean()
                expected.append(float(out["token_accuracy"]))
            return out
        base.forward = liger_like_forward
        args = SFTConfig(output_dir=str(tmp_path / str(token_accuracy)), report_to="none", use_cpu=True,
                         per_device_train_batch_size=2, max_steps=1)
        trainer = trainer_class("liger", token_accuracy)(
            model=model, args=args, processing_class=tiny_tokenizer,
            train_dataset=Dataset.from_dict({"input_ids": ids.tolist()}))
        loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels}, num_items_in_batch=60)
        assert torch.isfinite(loss) and asked == [token_accuracy]
        logged = trainer._metrics["train"].get("mean_token_accuracy", [])
        assert logged == (pytest.approx(expected) if token_accuracy else [])
        assert not token_accuracy or 0.0 <= logged[0] <= 1.0
        assert trainer._metrics["train"]["num_tokens"] == [ids.numel()]  # the tokens seen, as SFTTrainer logs them
        trainer.compute_loss(model, {"input_ids": ids, "labels": labels}, num_items_in_batch=60)
        assert trainer._metrics["train"]["num_tokens"] == [2 * ids.numel()]


@pytest.mark.slow
def test_the_recipe_trains_the_same_with_either_lm_head(tmp_path):
    """The whole recipe (SFTTrainer, packing, eval split, 2 micro-batches per step) with --set lm_head=liger and with
    TRL's head: the same logged losses step by step, so the trainer subclass normalises the loss over the step's
    labelled tokens (num_items_in_batch) as SFTTrainer does."""
    import json

    from tests.conftest import run_recipe

    losses = {}
    for head in ("trl", "liger"):
        proc = run_recipe(["--model-config", "tiny", "--output-dir", str(tmp_path / head / "out"), "--logs-dir",
                           str(tmp_path / head / "logs"), "--run-name", "r", "--max-steps", "3", "--resume", "never",
                           "--set", "logging_steps=1", "--set", "gradient_accumulation_steps=2",
                           "--set", "per_device_train_batch_size=2", "--set", f"lm_head={head}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(x) for x in (tmp_path / head / "logs" / "r" / "metrics.jsonl").read_text().splitlines()]
        losses[head] = [r["loss"] for r in rows if "loss" in r and "event" not in r]
    assert len(losses["trl"]) == 3
    assert losses["liger"] == pytest.approx(losses["trl"], rel=1e-5)


def test_fsdp_runs_peft_own_lora_forward(tiny_model_dir, monkeypatch, caplog):
    """Under FSDP the Trainer wraps every LoRA A and B as an FSDP unit of its own (peft's wrap policy), gathered only
    when that module is called: the fused function, which reads their weights without calling them, would see a
    shard. So FSDP=1 runs peft's forward, and the log says why."""
    import logging

    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets in every rank with FSDP=1
    with caplog.at_level(logging.INFO):
        model = load(tiny_model_dir, fused_lora=True)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(layers) == 14 and not any(hasattr(m, "_group") for m in layers)
    assert any("fused LoRA: off under FSDP" in r.getMessage() for r in caplog.records)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert all(hasattr(m, "_group") for m in load(tiny_model_dir, fused_lora=True).modules()
               if isinstance(m, LoraLinear4bit))


def kept_intermediate_tensors(model, ids) -> int:
    """How many distinct (tokens x intermediate) tensors a training forward keeps for its backward."""
    width, tokens, kept = model.config.intermediate_size, ids.numel(), set()

    def pack(t):
        if t.dim() and t.shape[-1] == width and t.numel() == tokens * width:
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return len(kept)


def test_the_gated_mlp_keeps_gate_and_up_not_their_product(tiny_model_dir, ids, monkeypatch):
    """The MLP's c = act(gate(x)) * up(x) is recomputed in the backward (LoRA4bitGatedDown): per layer a step keeps
    two (tokens x intermediate) tensors, gate's and up's outputs, which the activation's backward reads anyway.
    With -keepact (peft's and transformers' own forward) it also keeps c, and eager PyTorch act(gate) too: the
    memory the planner no longer counts (training/plan.py GATED_ACT_BYTES). The gradients: the test above."""
    layers = 2  # the tiny model's
    model = load(tiny_model_dir, fused_lora=True, gradient_checkpointing=False)
    assert [m._gated_act for m in model.modules() if hasattr(m, "_gated_act")] == ["gelu_tanh"] * layers
    assert kept_intermediate_tensors(model, ids) == 2 * layers
    monkeypatch.setattr(fast_lora, "RECOMPUTE_ACT", False)
    assert kept_intermediate_tensors(load(tiny_model_dir, fused_lora=True, gradient_checkpointing=False),
                                     ids) == 4 * layers
    assert kept_intermediate_tensors(load(tiny_model_dir, fused_lora=False, gradient_checkpointing=False),
                                     ids) == 4 * layers


def test_what_the_planner_counts_on_is_what_training_keeps(tiny_model_dir, ids):
    """training.fast_lora.recomputes_activation (the planner's answer) agrees with what a step really keeps, with and
    without LoRA dropout (peft's forward then runs and keeps the product) and LoRA only on attention."""
    from training.plan import Arch
    from training.tiny import TINY_ARCH

    arch = Arch.from_config(dict(TINY_ARCH, model_type="gemma2", hidden_activation="gelu_pytorch_tanh"))
    layers = 2
    for overrides, recompute in (({}, True), ({"lora_dropout": 0.1}, False),
                                 ({"target_modules": ".*(q|k|v|o)_proj"}, False)):
        cfg = replace(PRESETS["tiny"], **overrides)
        assert fast_lora.recomputes_activation(arch.model_type, arch.activation, cfg) == recompute, overrides
        model = load(tiny_model_dir, fused_lora=True, gradient_checkpointing=False, **overrides)
        kept = kept_intermediate_tensors(model, ids)  # gate's and up's outputs alone, or the product too (and more)
        assert kept == 2 * layers if recompute else kept > 2 * layers, (overrides, kept)


def test_peft_unload_leaves_a_working_mlp(tiny_model_dir, ids):
    """peft's unload() (and merge_and_unload()) put the base layers back: the gated MLP then runs its own forward,
    which gives the base model's output."""
    model = load(tiny_model_dir, fused_lora=True).eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert torch.equal(model.unload()(input_ids=ids).logits, base)


def test_a_swiglu_mlp_recomputes_its_activation_to_peft_s_gradients(tmp_path, ids):
    """Llama's SwiGLU (SiLU, as in SmolLM2, Mistral, Qwen): the same function with the other activation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    plain_loss, plain = loss_and_grads(load(tmp_path, fused_lora=False), ids)
    fused_model = load(tmp_path, fused_lora=True)
    assert [m._gated_act for m in fused_model.modules() if hasattr(m, "_gated_act")] == ["silu", "silu"]
    fused_loss, fused = loss_and_grads(fused_model, ids)
    assert_same_loss_and_grads(plain_loss, plain, fused_loss, fused)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA card (run on the device: "
                    "python -m training.gated_act --check)")
def test_the_gated_activation_kernels_match_pytorch_on_cuda():
    from training import gated_act

    assert gated_act.check() == []
