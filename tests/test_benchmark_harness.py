"""The benchmark harness's accounting (scripts/benchmark.py): what it counts as real tokens and useful work, how it
packs chat samples, and that every path sees the same samples. The speed itself is measured on a GPU, never here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchmark as bench  # noqa: E402

from training.plan import Arch  # noqa: E402

ARCH = Arch(num_layers=2, hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=2, head_dim=16)


def test_variant_names_are_parsed_and_typos_refused():
    v = bench.parse_variant("unsloth-2b-mb16-ckpt0-chat")
    assert (v["path"], v["shape"], v["mb"], v["ckpt"], v["chat"]) == ("unsloth", "2b", 16, False, True)
    assert bench.parse_variant("project24-9b")["gpu_mem"] == 24.0
    assert bench.parse_variant("project-2b-compile")["compile"] and not bench.parse_variant("project-2b")["compile"]
    assert [bench.parse_variant(f"project-2b{p}")["fp8"] for p in ("", "-fp8", "-fp8all")] == ["", "backward", "all"]
    assert [bench.parse_variant(f"project-2b-chat{p}")["lm_head"] for p in ("", "-ligerhead", "-trlhead")] == \
        ["auto", "liger", "trl"]
    assert bench.parse_variant("unsloth-2b-mb8-ckpt0-adam32")["adam32"] and not bench.parse_variant("project-2b")["adam32"]
    cute = {"LIGER_KERNEL_IMPL_ROPE": "nvidia-cutedsl"}
    assert bench.liger_env(bench.parse_variant("project-2b-chat-cute")) == cute
    assert bench.liger_env(bench.parse_variant("recipe-2b-cute")) == cute
    assert bench.liger_env(bench.parse_variant("project-2b-chat")) == {}  # the recipe's own choice: Triton's on sm_90+
    assert [bench.parse_variant(f"project-2b{p}")["attention"] for p in ("", "-fa4", "-flex")] == \
        ["auto", "flash_attention_4", "flex_attention"]
    assert bench.parse_variant("recipe-2b-w1024")["window"] == 1024 and bench.parse_variant("recipe-2b")["window"] is None
    for bad in ("unsloth-2b", "projekt-2b", "project-3b", "project-2b-fast", "unsloth-2b-mb16-ckpt0-compile",
                "unsloth-2b-mb16-ckpt0-fp8", "baseline-2b-fa4", "project-2b-w1024", "recipe-2b-w0",
                "recipe-2b-adam32", "unsloth-2b-mb8-ckpt0-ligerhead", "unsloth-2b-mb8-ckpt0-cute",
                "unsloth-2b-mb8-ckpt0-bnb8", "project-2b-adam32-bnb8", "project-2b-bnb8-adam32", "project-2b-flat8",
                "recipe-2b-basefirst", "baseline-2b-basefirst", "recipe-2b-nogroup", "unsloth-2b-mb8-nogroup",
                "recipe-2b-keepact"):
        with pytest.raises(SystemExit, match="variant"):
            bench.parse_variant(bad)
    for name in bench.DEFAULT_VARIANTS.split(","):
        bench.parse_variant(name)


def test_project_rows_run_the_recipes_flat_8bit_adamw_and_bnb8_bitsandbytes_own(tmp_path, monkeypatch, bnb_warm):
    """The project rows' optimizer is the recipe's (training.optim.FlatAdamW8bit), -bnb8 bitsandbytes' own per-tensor
    one: with 8-bit moments on every LoRA tensor of the tiny shape (its 1,024-element tensors are under the 4,096 a
    2B row's all pass), the two rows train to the same losses, step for step."""
    monkeypatch.setattr(bench, "SEQ", 256)
    monkeypatch.setattr(bench, "ADAMW_8BIT", {"lr": 1e-2, "min_8bit_size": 256})
    flat, per = (bench.run_variant(name, tmp_path, 3, 0, "cpu") for name in ("project-tiny", "project-tiny-bnb8"))
    assert per["desc"].endswith("bitsandbytes' per-tensor 8-bit AdamW") and "AdamW" not in flat["desc"]
    assert flat["losses"] == per["losses"] and len(set(flat["losses"])) == 3
    assert all(math.isfinite(x) for x in flat["losses"])


def test_basefirst_nogroup_and_keepact_run_the_former_fused_lora_to_the_same_losses(tmp_path, monkeypatch):
    """-basefirst: the fused LoRA function's former order (base product first), per layer; -nogroup: per layer in
    the default order; -keepact: the MLP's gated activation kept. Each in its own row, to the losses of the default
    (grouped, activation recomputed) up to float rounding; the default row leaves all three off."""
    from training import fast_lora

    monkeypatch.setattr(bench, "SEQ", 256)
    monkeypatch.setattr(fast_lora, "BASE_FIRST", False)  # a row sets them in its own process; restored after
    monkeypatch.setattr(fast_lora, "GROUPED", True)
    monkeypatch.setattr(fast_lora, "RECOMPUTE_ACT", True)
    default = bench.run_variant("project-tiny", tmp_path, 3, 0, "cpu")
    assert not fast_lora.BASE_FIRST and fast_lora.GROUPED and fast_lora.RECOMPUTE_ACT
    assert "fused LoRA" not in default["desc"] and "kept" not in default["desc"]
    kept = bench.run_variant("project-tiny-keepact", tmp_path, 3, 0, "cpu")
    assert not fast_lora.RECOMPUTE_ACT and "gated activation kept" in kept["desc"]
    monkeypatch.setattr(fast_lora, "RECOMPUTE_ACT", True)
    per_layer = bench.run_variant("project-tiny-nogroup", tmp_path, 3, 0, "cpu")
    assert not fast_lora.BASE_FIRST and not fast_lora.GROUPED and "per layer" in per_layer["desc"]
    monkeypatch.setattr(fast_lora, "GROUPED", True)
    first = bench.run_variant("project-tiny-basefirst", tmp_path, 3, 0, "cpu")
    assert fast_lora.BASE_FIRST and not fast_lora.GROUPED and "base product first" in first["desc"]
    for row in (kept, per_layer, first):
        assert default["losses"] == pytest.approx(row["losses"], rel=1e-5) and len(set(row["losses"])) == 3


def test_a_window_variant_is_the_same_model_with_a_window_its_rows_outgrow(tmp_path):
    """recipe-2b-w1024: the same weights (linked, not copied), the config's sliding window changed, read back by the
    recipe's own reader, so the recipe sees a window that binds on 2048-token rows."""
    from training.model import load_base_config, sliding_window_of

    src = bench.model_dir("tiny", tmp_path, device="cpu")
    out = bench.with_window(src, 8)
    assert sliding_window_of(load_base_config(str(out))) == 8
    assert sliding_window_of(load_base_config(str(src))) != 8  # the original is untouched
    weights = [f for f in out.iterdir() if f.name.endswith(".safetensors")]
    assert weights and all(f.is_symlink() and f.resolve().parent == src.resolve() for f in weights)
    (out / "config.json").write_text((out / "config.json").read_text() + "\n")  # made once: kept as it is
    mark = (out / "config.json").read_text()
    assert bench.with_window(src, 8) == out and (out / "config.json").read_text() == mark


def test_useful_flops_by_hand():
    """4 FLOPs per base parameter per loss-bearing token, plus 3x the forward attention over each sample's own
    causal context; padding and prompt tokens are no useful work."""
    base = ARCH.linear_params() + ARCH.hidden * ARCH.vocab
    per_ctx = 4 * ARCH.heads * ARCH.head_dim * ARCH.num_layers
    padded = {"input_ids": [[5, 6, 7, 0]], "labels": [[-100, 6, 7, -100]], "attention_mask": [[1, 1, 1, 0]]}
    assert bench.useful_flops(ARCH, padded) == 4.0 * base * 2 + 3.0 * per_ctx * (3 * 4 / 2)
    packed = {"input_ids": [[5, 6, 7, 8, 9, 0]], "labels": [[-100, 6, 7, -100, 9, -100]],
              "position_ids": [[0, 1, 2, 0, 1, 0]]}
    assert bench.sample_lengths(packed, 0) == [3, 2]  # the trailing pad "sample" carries no loss: not counted
    assert bench.useful_flops(ARCH, packed) == 4.0 * base * 3 + 3.0 * per_ctx * (3 * 4 / 2 + 2 * 3 / 2)
    full = {"input_ids": [[1, 2, 3, 4]], "labels": [[1, 2, 3, 4]]}
    assert bench.sample_lengths(full, 0) == [4] and bench.real_tokens([full]) == 4


def test_chat_lengths_look_like_sft_chat_data():
    lengths = bench.chat_lengths(4000)
    lengths.sort()
    median = lengths[len(lengths) // 2]
    assert 300 <= median <= 400 and max(lengths) == bench.SEQ and min(lengths) >= 16
    assert bench.chat_lengths(50, seed=3) == bench.chat_lengths(50, seed=3)


def test_packed_and_padded_steps_hold_the_same_samples(monkeypatch):
    """The project packs (TRL's BFD), the others pad: the same loss-bearing tokens either way, so real tokens/s
    compare the same work; packed rows are nearly all real tokens, padded micro-batches far less."""
    monkeypatch.setattr(bench, "CHAT_SAMPLES_PER_STEP", 24)
    v = bench.parse_variant("project-tiny-chat")
    packed = bench.step_batches(0, v, 4, True, 512)
    padded = bench.step_batches(0, v, 4, False, 512)
    assert bench.real_tokens(packed) == bench.real_tokens(padded)
    for b in packed:  # padding-free, as the recipe's collator: one row per micro-batch, of up to 4 packed rows
        (ids,), (labels,), (pos,) = b["input_ids"], b["labels"], b["position_ids"]
        assert len(ids) == len(labels) == len(pos) <= 4 * bench.SEQ and 0 not in ids  # no padding token
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert all(labels[s] == -100 for s in starts)  # no loss across a sample boundary
    assert sum(len(b["input_ids"][0]) for b in packed) == sum(bench.chat_lengths(24, seed=0))
    assert bench.all_tokens(packed) < bench.all_tokens(padded)
    # the same step is the same data for every variant and micro-batch split
    assert bench.step_batches(0, v, 2, False, 512)[0]["input_ids"] == padded[0]["input_ids"][:2]
    full = bench.step_batches(1, bench.parse_variant("baseline-tiny"), 4, False, 512)
    assert len(full) == bench.ROWS_PER_STEP // 4 and bench.real_tokens(full) == bench.ROWS_PER_STEP * bench.SEQ


def test_packed_micro_batches_are_what_the_recipes_collator_makes(monkeypatch):
    """A packed micro-batch is TRL's padding-free collation, as SFTTrainer's: from trl 1.16 it carries the samples'
    boundaries, computed on the host, which must match the position_ids (else the varlen kernels would attend
    across samples); -posids drops them (the trl 1.15 path, the model deriving them in every layer)."""
    import itertools
    from importlib.metadata import version

    from packaging.version import Version

    monkeypatch.setattr(bench, "CHAT_SAMPLES_PER_STEP", 24)
    v = bench.parse_variant("project-tiny-chat")
    batches = bench.step_batches(0, v, 4, True, 512)
    trl_has_boundaries = Version(version("trl")) >= Version("1.16")
    samples = bench.chat_lengths(24, seed=0)
    rows = bench.pack_rows([([3] * n, 1) for n in samples])  # the packer's own lengths, independent of the collator
    for i, b in enumerate(batches):
        lengths = [n for r in rows[4 * i:4 * i + 4] for n in r["seq_lengths"]]
        (pos,) = b["position_ids"]
        assert [i for i, p in enumerate(pos) if p == 0] == list(itertools.accumulate([0] + lengths[:-1]))
        if trl_has_boundaries:
            bounds = [0] + list(itertools.accumulate(lengths))
            assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == bounds
            assert b["max_length_q"] == b["max_length_k"] == max(lengths)
    assert trl_has_boundaries == ("cu_seq_lens_q" in batches[0])
    plain = bench.step_batches(0, bench.parse_variant("project-tiny-chat-posids"), 4, True, 512)
    assert [set(b) for b in plain] == [{"input_ids", "labels", "position_ids"}] * len(batches)
    assert [b["labels"] for b in plain] == [b["labels"] for b in batches]


def test_a_profiled_project_step_runs_the_recipes_path_on_the_cpu(monkeypatch, tmp_path):
    """The project path end to end on the tiny model (the recipe's prepare() and loader, TRL's head, collated packed
    chat rows), with one more step profiled, on a batch not run before: the losses fall, and the profile counts the
    host's waits (at least the loss read after each micro-batch)."""
    monkeypatch.setattr(bench, "CHAT_SAMPLES_PER_STEP", 8)
    monkeypatch.setattr(bench, "SEQ", 256)
    r = bench.run_variant("project-tiny-chat-prof", tmp_path, 2, 0, "cpu")
    assert r["packed"] and r["accumulation"] >= 1 and len(r["losses"]) == 2
    assert all(math.isfinite(x) for x in r["losses"]) and r["losses"][1] < r["losses"][0]
    prof = r["profile"]
    assert prof["wall_s"] > 0 and prof["host_syncs"]["aten::_local_scalar_dense"] >= r["accumulation"]
    assert prof["step"] == 2  # a batch none of the timed steps ran, as every step of a real run is new
    assert prof["host_self_s"] and all(sec >= 0 for _, sec in prof["host_self_s"])
    assert any("aten::item" in where for where in prof["sync_sources"])  # the loss read after each micro-batch
    assert r["versions"]["trl"] != "-"
    assert bench.parse_variant("project-2b-chat-prof")["profile"] and not bench.parse_variant("project-2b")["profile"]
