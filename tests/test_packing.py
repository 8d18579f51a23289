"""Padding-free packing (on by default) is exact for Gemma-2 with eager and with flex attention, which both keep its
logit soft-capping: TRL's BFD packing emits position_ids that restart at 0 for each sample and no attention mask, and
transformers 5 turns those into a per-sample causal (and sliding-window) mask, so packed samples never attend to
each other. Checked on the built-in tiny Gemma-2, then through the recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """flex attention as the GPU runs it, minus the compilation: torch.compile of flex attention takes minutes on
    these CPUs, and the compiled kernel computes what the uncompiled one does (the same score_mod for the soft-cap,
    the same block mask). The compiled kernel is checked against eager on the card itself: the flex self-check
    (training.backends) before the recipe uses it."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, *args, **kwargs: fn if fn is not None else (lambda f: f))


@pytest.mark.parametrize("attention", ["eager", "flex_attention"])
@pytest.mark.parametrize("sliding_window", [None, 8])  # 8: shorter than every sample, the local layers' mask too
def test_packed_row_gives_each_sample_its_own_logits(tiny_model_dir, sliding_window, attention, request):
    from transformers import AutoModelForCausalLM

    if attention == "flex_attention":
        request.getfixturevalue("uncompiled_flex")
    extra = {"sliding_window": sliding_window} if sliding_window else {}
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attention,
                                                 dtype=torch.float32, **extra).eval()
    assert model.config.attn_logit_softcapping, "the tiny model must soft-cap like Gemma-2"
    assert model.config._attn_implementation == attention
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(4, model.config.vocab_size, (n,), generator=gen) for n in (23, 40, 17)]
    # use_cache=False as in training (the recipe sets it, TRL passes it): with a KV cache transformers does not look
    # for packed samples in the position_ids.
    with torch.no_grad():
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in samples]
        row = torch.cat(samples)[None]
        positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        leaky = model(input_ids=row, use_cache=False).logits[0]  # one long sequence: no per-sample masks
    start = 0
    for i, (sample, ref) in enumerate(zip(samples, alone)):
        part = slice(start, start + len(sample))
        assert torch.allclose(packed[part], ref, atol=1e-5, rtol=0), f"sample {i} attended outside itself"
        if i > 0:  # the control: without the per-sample mask, later samples do see the earlier ones
            assert (leaky[part] - ref).abs().max() > 1e-3, f"sample {i}: the control did not detect leakage"
        start += len(sample)


def test_recipe_with_packing_fills_its_rows_and_trains(tmp_path):
    """The tiny preset with packing: rows of real tokens close to max_seq_length (unpacked, the sample chats average
    about a quarter of it), counted without padding, and the run finishes with an adapter."""
    proc = subprocess.run(
        [sys.executable, "-m", "training.qlora_finetune", "--model-config", "tiny", "--max-steps", "3",
         "--set", "packing=true", "--set", "logging_steps=1", "--output-dir", str(tmp_path / "out"),
         "--logs-dir", str(tmp_path / "logs"), "--resume", "never"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    cfg = summary["config"]
    row_tokens = cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"] * cfg["max_seq_length"]
    per_step = summary["tokens_seen"] / summary["steps"]
    assert 0.8 * row_tokens <= per_step <= row_tokens, (per_step, row_tokens)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_trl_packed_batches_carry_restarting_positions_and_no_attention_mask(tiny_model_dir, tmp_path):
    """What the first test relies on, from the trainer the recipe builds (`packing=True` with TRL's default BFD
    strategy, on this project's tokenized datasets): rows hold several samples, positions restart at 0 in each, and
    there is no attention mask (with one, transformers would not look for packed samples)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from training.data import build_datasets

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    train_ds, _, _ = build_datasets(str(REPO / "datasets" / "sample"), tokenizer, 256, 0.0, 0, True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager")
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=256, per_device_train_batch_size=2,
                     use_cpu=True, report_to=[], dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch, sorted(batch)
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) > 2, "a packed row should hold several samples"
    ends = starts[1:] + [len(positions)]
    for start, end in zip(starts, ends):
        assert positions[start:end].tolist() == list(range(end - start))
    assert (batch["labels"][0][starts] == -100).all()  # no sample is trained to predict from another's last token
