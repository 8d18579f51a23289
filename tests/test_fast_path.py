"""The project's fast path on the real 4-bit layers (bitsandbytes NF4 on the CPU): the fused LoRA function computes
what peft computes, forward and backward; per-layer checkpointing keeps exactly the layers it says; the frozen
norms and embeddings keep the compute dtype unless the fp32 upcast is asked for. (Its speed: docs/benchmarks.md.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

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


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))


def test_fused_lora_equals_peft_forward_and_backward(tiny_model_dir, ids):
    plain_loss, plain = loss_and_grads(load(tiny_model_dir, fused_lora=False), ids)
    fused_model = load(tiny_model_dir, fused_lora=True)
    fused_loss, fused = loss_and_grads(fused_model, ids)
    assert plain.keys() == fused.keys() and len(plain) == 28  # A and B of 14 LoRA layers
    assert abs(fused_loss - plain_loss) < 1e-6
    for name in plain:
        assert torch.allclose(fused[name], plain[name], rtol=1e-4, atol=1e-7), name
        assert fused[name].abs().sum() > 0, name
    # states the fused path does not compute fall back to peft's own forward: the base alone, adapters off
    with torch.no_grad():
        with fused_model.disable_adapter():
            base_fused = fused_model(input_ids=ids).logits
    reference = load(tiny_model_dir, fused_lora=False)
    with torch.no_grad():
        with reference.disable_adapter():
            base_plain = reference(input_ids=ids).logits
    assert torch.allclose(base_fused, base_plain, atol=1e-6)


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
