"""QLoRA step benchmark on a CUDA card: the seed's baseline, unsloth standalone and the project path, in one call.

Every path runs the optimizer step the way its users run it: under bf16 autocast, as HF Trainer (bf16=True) does
(the old loop without autocast left the fp32-upcast norms' outputs in fp32 and ran the baseline ~1.8x too slow),
with 8-bit AdamW, gradient clipping at 0.3 and the same batches, step for step. Models have the real Gemma-2-2B/9B
shapes with random weights (same FLOPs and bytes as the real ones, no download). Each variant runs in its own
subprocess (Liger and unsloth patch transformers globally).

    python scripts/benchmark.py                                  # the default set, writes docs/benchmarks.md
    python scripts/benchmark.py --variants baseline-2b,project-2b --steps 4
    make bench ARGS="--variants unsloth-2b-mb16-ckpt0"

Variant names: PATH[24]-SHAPE[-mbN][-ckpt0|1][-chat][-sN] (-sN: N timed steps instead of --steps)
- baseline: the seed's recipe (transformers + peft + bitsandbytes, peft's fp32 upcast, eager attention, logits
  materialised, gradient checkpointing, LoRA dropout 0.05, micro-batch 4 x 4 on 2B, 2 x 8 on 9B).
- unsloth: unsloth's FastLanguageModel standalone (its kernels, its checkpointing when ckpt1), micro-batch N.
- project: the recipe's own functions (backend auto, attention auto, LM head auto, the planner), planned for this card;
  project24: planned for a 24 GiB card (an RTX 4090). -fa4 / -flex ask for FlashAttention 4 / flex attention by
  name. The recipe refuses one that fails its self-check; a project row runs it anyway, for its speed, and the
  row's description carries the check's verdict (a recipe row with it is refused, as a user's run would be).
  -ligerhead / -trlhead ask for an LM head by name (auto: Liger's where Liger is applied, else TRL's).
- recipe: the whole recipe (`python -m training.qlora_finetune`, SFTTrainer) for a few steps; tokens/s from its
  metrics.jsonl. It checks that the harness loop times what a user's run does.
- -wN (recipe): the base model's sliding window set to N tokens (its weights linked). Below 2048 the rows outgrow
  it, so the recipe checks and runs FlashAttention 4's windowed kernel (the `fa4-window` self-check), as a Gemma-2
  run past 4,096 tokens does.
- -prof: one more step on a batch never run before, under torch.profiler: device time by kernel category, the
  costliest kernels, the GPU's busy share of the wall time, the host's own time by op, and the host-device syncs
  with the ops that waited (`profile`).
- -nosync (project, exploratory; implies -bnb8): bitsandbytes' own 8-bit AdamW (0.50) calls
  torch.cuda.synchronize() after every parameter's update, 364 times a 2B step; this row skips those syncs (its
  updates run on the default stream, as the rest of the step does, so they stay ordered). Its losses must match the
  row without it.
- -adam32 (exploratory): fused 32-bit AdamW (`torch.optim.AdamW(fused=True)`, the recipe's `--set
  optim=adamw_torch_fused`) instead of bitsandbytes' 8-bit AdamW, which updates one LoRA tensor per kernel launch
  (364 a 2B step). LoRA's moments in 32 bits cost ~0.2 GiB more on 2B (0.6 on 9B), which the planner counts.
- -bnb8 (project): bitsandbytes' own 8-bit AdamW, one LoRA tensor per launch (364 a 2B step), as the recipe ran it
  before 2026-12-07. The project rows otherwise run the recipe's (training.optim.FlatAdamW8bit: the same update in
  one launch per step). Its losses must match the row without it.
- -basefirst (project): the fused LoRA function's base product first and the adapter's accumulated onto it, as
  the recipe ran it before 2026-12-07 (training.fast_lora.BASE_FIRST). The recipe now writes the rank-r product
  first and accumulates the base product onto it, so the rank-r matmul, bound by memory, no longer reads and
  rewrites each output and input gradient (the base matmul reads it in its epilogue). Its losses must match the
  row without it to bf16 rounding. It runs per layer too (no groups, below), as the recipe did then.
- -nogroup (project): the fused LoRA per layer. The recipe runs q, k and v (and gate and up), which read one input,
  as one function since 2026-12-07 (training.fast_lora.GROUPS): their adapters' products with the input are one
  matmul, and one input gradient takes every member's matmuls in turn, so autograd no longer sums 3 (tokens x
  hidden) gradients per layer. Its losses must match the row without it to bf16 rounding.
- -keepact (project): the MLP's gated activation (act(gate) * up) kept for the backward, as the recipe did until
  2026-12-07's second lease, and planned so. The recipe now keeps gate's and up's outputs only and recomputes their
  product in the backward (training.fast_lora.LoRA4bitGatedDown): one (tokens x intermediate) tensor less per
  layer, so the planner recomputes fewer layers. Its losses must match the row without it to bf16 rounding.
- -cute (project and recipe): Liger's CuTe DSL RoPE by name, which the recipe keeps on Triton's on sm_90+
  (training.backends.LIGER_TRITON_OPS). It is what Liger 0.8 picks by itself there once nvidia-cutlass-dsl is
  installed (FA4 brings it; a row without it fails), and what the recipe ran before 2026-12-06's sixth lease. On a
  fresh chat batch that RoPE spent 0.78 s of host time per step (H100), with the GPU busy half the wall time.
  It replaces -tritonrope / -ligertriton, which older sections of docs/benchmarks.md name.
- -posids (project, exploratory): packed rows without the sample boundaries TRL's collator computes on the host
  (trl >= 1.16), so the model derives them from position_ids in every layer, as with trl 1.15.
- -chat: variable-length chat samples (log-normal lengths, median 350 tokens, capped at 2048; the prompt third
  carries no loss), the same samples for every path. The project packs them into full rows (exact, per-sample
  attention); baseline and unsloth pad each micro-batch to its longest sample, length-grouped (HF's
  group_by_length: their best case). "real tokens" are the loss-bearing ones.
QLORA_BENCH_PROJECT_SITE=DIR puts DIR first on the project and recipe rows' PYTHONPATH: the packages the project's
own install resolves to where the peer's pins differ (scripts/device/bench_driver.sh: trl 1.16 against unsloth's 1.15).
Reported: tokens/s (all tokens in the rows) and real tokens/s, peak GiB (`max_memory_allocated`, first steps
included) against the planner's prediction, useful-work MFU (forward + input gradients: 4 FLOPs per base parameter
per real token, plus attention over each sample's own context; no recompute counted) against the card's measured
bf16 matmul rate, and the loss curve against the baseline's on the same batches.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    "2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, vocab_size=256000),
    "9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256, vocab_size=256000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),  # the harness's own test on a CPU
}
SEQ = 2048
ROWS_PER_STEP = 16  # full rows: 16 x 2048 = 32,768 tokens per optimizer step, as the presets
CHAT_MEDIAN, CHAT_SIGMA, CHAT_PROMPT_SHARE = 350, 0.9, 1 / 3
CHAT_SAMPLES_PER_STEP = 96  # about 46k tokens: every path sees the same samples per optimizer step
LORA_R = 32
ADAMW_8BIT = {"lr": 2e-4}  # and bitsandbytes' defaults (weight decay 1e-2; 8-bit moments from 4,096 elements)
ATTENTION_PARTS = {"fa4": "flash_attention_4", "flex": "flex_attention"}  # -fa4 / -flex: the attention by name
DEFAULT_VARIANTS = ",".join([  # most telling first: a call cut short by the device's time limit keeps those
    "project-2b-s18", "unsloth-2b-mb16-ckpt0-s18", "baseline-2b-s18", "unsloth-2b-mb8-ckpt0", "unsloth-2b-mb4-ckpt0",
    "unsloth-2b-mb16-ckpt1", "unsloth-2b-mb4-ckpt1", "project24-2b", "project-2b-chat", "unsloth-2b-mb16-ckpt0-chat",
    "baseline-2b-chat", "recipe-2b", "project24-9b", "unsloth-9b-mb16-ckpt1", "baseline-9b",
])


# ------------------------------------------------------------------------------------------------ variants

def parse_variant(name: str) -> dict:
    parts = name.split("-")
    path, shape = parts[0], parts[1]
    v = {"name": name, "path": path.removesuffix("24"), "gpu_mem": 24.0 if path.endswith("24") else None,
         "shape": shape, "mb": None, "ckpt": None, "chat": False, "steps": None, "compile": False,
         "keep": None, "fp8": "", "lm_head": "auto", "attention": "auto", "posids": False, "profile": False,
         "nosync": False, "window": None, "adam32": False, "bnb8": False, "liger_cute": False,
         "base_first": False, "grouped": True, "recompute_act": True}
    if v["path"] not in ("baseline", "unsloth", "project", "recipe") or shape not in SHAPES:
        raise SystemExit(f"error: unknown variant '{name}' (PATH[24]-SHAPE[-mbN][-ckpt0|1][-chat][-sN][-kN][-wN][-fa4|-flex][-fp8|-fp8all][-ligerhead|-trlhead][-posids][-adam32|-bnb8|-nosync][-basefirst|-nogroup][-keepact][-cute][-compile][-prof]; "
                         f"paths baseline, unsloth, project, recipe; shapes {', '.join(SHAPES)})")
    for p in parts[2:]:
        if p.startswith("mb"):
            v["mb"] = int(p[2:])
        elif p.startswith("ckpt"):
            v["ckpt"] = p == "ckpt1"
        elif p == "chat":
            v["chat"] = True
        elif p.startswith("k") and p[1:].isdigit() and v["path"] == "project":
            v["keep"] = int(p[1:])  # exploratory: this many layers keep their activations (the rest recompute)
        elif p.startswith("w") and p[1:].isdigit() and int(p[1:]) > 0 and v["path"] == "recipe":
            v["window"] = int(p[1:])  # the base model's sliding window; below 2048 it binds: FA4's windowed kernel
        elif p in ATTENTION_PARTS and v["path"] in ("project", "recipe"):
            v["attention"] = ATTENTION_PARTS[p]  # by name instead of the recipe's auto choice
        elif p in ("ligerhead", "trlhead") and v["path"] == "project":
            v["lm_head"] = p.removesuffix("head")  # by name instead of auto (Liger's where it is applied, else TRL's)
        elif p in ("fp8", "fp8all") and v["path"] == "project":
            v["fp8"] = "backward" if p == "fp8" else "all"  # fp8_backward; fp8all: the forward too (exploratory)
        elif p == "posids" and v["path"] == "project":
            v["posids"] = True  # exploratory: packed rows without the collator's varlen boundaries (trl < 1.16)
        elif p == "prof" and v["path"] != "recipe":
            v["profile"] = True  # one more optimizer step under torch.profiler (not timed): where the time goes
        elif p == "nosync" and v["path"] == "project" and not v["adam32"]:
            v["nosync"] = v["bnb8"] = True  # exploratory: bitsandbytes' own 8-bit AdamW without its per-tensor sync
        elif p == "cute" and v["path"] in ("project", "recipe"):
            v["liger_cute"] = True  # Liger's CuTe DSL RoPE on sm_90+, as Liger picks it unless the recipe pins
        elif p == "adam32" and v["path"] != "recipe" and not v["bnb8"]:
            v["adam32"] = True  # exploratory lever: fused 32-bit AdamW instead of 8-bit
        elif p == "bnb8" and v["path"] == "project" and not v["adam32"]:
            v["bnb8"] = True  # bitsandbytes' own 8-bit AdamW, one tensor at a time (the recipe's before 2026-12-07)
        elif p == "basefirst" and v["path"] == "project":
            v["base_first"] = True  # the fused LoRA's base product first, the adapter's onto it (before 2026-12-07)
            v["grouped"] = False  # and per layer, as then
        elif p == "nogroup" and v["path"] == "project":
            v["grouped"] = False  # the fused LoRA per layer: q, k, v (gate, up) each reading their input
        elif p == "keepact" and v["path"] == "project":
            v["recompute_act"] = False  # the MLP's gated activation kept (as until 2026-12-07), planned so
        elif p == "compile" and v["path"] == "project":
            v["compile"] = True  # exploratory lever: torch.compile of each decoder layer
        elif p.startswith("s") and p[1:].isdigit():
            v["steps"] = int(p[1:])
        else:
            raise SystemExit(f"error: variant '{name}': unknown part '{p}'")
    if v["path"] == "unsloth" and (v["mb"] is None or v["ckpt"] is None):
        raise SystemExit(f"error: variant '{name}': unsloth variants name their micro-batch and checkpointing, "
                         "e.g. unsloth-2b-mb16-ckpt0")
    return v


def model_dir(shape: str, root: Path, device: str = "cuda") -> Path:
    """Random-init Gemma-2 of the real shape, saved once in bf16, with the tiny tokenizer (unsloth wants one)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    path = root / f"gemma2-{shape}"
    if (path / "config.json").is_file():
        return path
    cfg = Gemma2Config(max_position_embeddings=8192, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        m = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(str(path))
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    from training.tiny import build_tiny_model, default_dir

    for f in build_tiny_model(default_dir()).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            (path / f.name).write_bytes(f.read_bytes())
    return path


def with_window(path: Path, window: int) -> Path:
    """The same model with its sliding window set to `window` tokens (its weights linked, not copied)."""
    out = path.parent / f"{path.name}-w{window}"
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():
            if f.name != "config.json" and not (out / f.name).is_symlink():  # a link left by a cut run is kept
                (out / f.name).symlink_to(f.resolve())
        cfg = json.loads((path / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, "sliding_window": window}, indent=1))
    return out


def load_baseline(path: Path, device: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    m = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=dtype,
                                             attn_implementation="eager", device_map={"": 0 if device == "cuda" else "cpu"})
    m.config.use_cache = False
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    return get_peft_model(m, LoraConfig(r=LORA_R, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                        task_type="CAUSAL_LM"))


def load_variant(v: dict, path: Path, device: str) -> tuple:
    """(model, micro_batch, packed, description, predicted_peak_gib)."""
    from training.plan import Arch, estimate_peak

    arch = Arch.from_config(json.loads((path / "config.json").read_text()))
    if v["path"] == "baseline":
        bs = v["mb"] or (2 if v["shape"] == "9b" else 4)
        est = estimate_peak(arch, bs, SEQ, LORA_R, "hf", True, fused_loss=False, eager_attention=True, optim=optim_of(v))
        return (load_baseline(path, device), bs, False, "transformers + peft, fp32 upcast, eager, logits "
                "materialised, checkpointing", est.peak_gib)
    if v["path"] == "unsloth":
        from training.backends import load_unsloth

        m = load_unsloth(str(path), SEQ, LORA_R, 16, 0.0, v["ckpt"], 0)
        est = estimate_peak(arch, v["mb"], SEQ, LORA_R, "unsloth", v["ckpt"], optim=optim_of(v))
        return m, v["mb"], False, f"unsloth FastLanguageModel, checkpointing {'on' if v['ckpt'] else 'off'}", est.peak_gib
    return load_project(v, path, device, arch)


def liger_env(v: dict) -> dict:
    """-cute: Liger's CuTe DSL kernels by name for the ops the recipe pins to Triton's on sm_90+ (a setting made
    before the recipe's wins over its pin); otherwise nothing."""
    from training.backends import LIGER_TRITON_OPS

    return {f"LIGER_KERNEL_IMPL_{op.upper()}": "nvidia-cutedsl" for op in LIGER_TRITON_OPS} if v["liger_cute"] else {}


def optim_of(v: dict) -> str:
    """The recipe's name for the optimizer a row runs (run_variant builds it): what its plan and estimate count."""
    return "adamw_torch_fused" if v["adam32"] else "adamw_8bit"


def use_sft_head(model, lm_head: str) -> None:
    """The LM head and loss as the recipe's trainer runs them (training/lm_head.py). `trl`: TRL's SFTTrainer (>= 1.15)
    patches every model it trains with its own fused LM head (`trl.trainer.utils.add_fused_lm_head`) and calls it with
    `fused_lm_head=True`; Liger's fused cross-entropy is then off the training path. `liger`: Liger's fused
    cross-entropy on the labelled positions only. optimizer_step calls the model the same way."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))  # SFTTrainer's outputs
    model.sft_head = lm_head


def load_project(v: dict, path: Path, device: str, arch) -> tuple:
    """The recipe's own start (training.qlora_finetune.prepare: device, backend as applied, attention, planner),
    then the backend's loader."""
    from dataclasses import replace

    import torch

    from training.plan import estimate_peak, recompute_act_for
    from training.qlora_config import PRESETS
    from training.qlora_finetune import prepare
    from training.runfiles import RunPaths

    preset = "gemma-9b" if v["shape"] == "9b" else "gemma-2b"
    verdicts = []
    if v["attention"] != "auto":  # timed even where the recipe would refuse it: the check's verdict goes in the row
        import training.backends as backends

        real_check = backends.run_self_check

        def noting_check(name, **shape):  # resolve_attention passes the run's attention shape by keyword
            ok, detail = real_check(name, **shape)
            verdicts.append(f"{name} self-check {'passed' if ok else 'FAILED'} ({detail})")
            return True, detail
        backends.run_self_check = noting_check
    from training import fast_lora

    # The fused LoRA's exploratory switches before prepare(): the planner counts what the fused path keeps
    notes = []
    if v["base_first"]:
        fast_lora.BASE_FIRST = True
        notes.append("fused LoRA: base product first (exploratory)")
    if not v["grouped"]:
        fast_lora.GROUPED = False
        notes.append("fused LoRA per layer (no groups)")
    if not v["recompute_act"]:
        fast_lora.RECOMPUTE_ACT = False
        notes.append("the MLP's gated activation kept (not recomputed)")
    # lm_head and fp8_backward are set before prepare(): the backend checks them there, as in the recipe
    cfg = replace(PRESETS[preset], model_name_or_path=str(path), gpu_mem_gib=v["gpu_mem"] or 0.0, max_seq_length=SEQ,
                  device=device, allow_cpu=True, min_gpu_mem_gib=0.0, lora_r=LORA_R, disk_check=False,
                  lm_head=v["lm_head"], fp8_backward=bool(v["fp8"]), attn_implementation=v["attention"],
                  optim=optim_of(v))  # planned with the optimizer the row runs
    setup = prepare(cfg, preset, RunPaths.of(v["name"], path.parent / "runs" / v["name"]), resume="never")
    cfg, line = setup.cfg, setup.plan_line
    line += "".join(f"; {x}" for x in verdicts + notes)
    if v["mb"]:
        cfg = replace(cfg, per_device_train_batch_size=v["mb"])
    if cfg.lm_head != "trl":
        line += f"; lm_head={cfg.lm_head}"
    if cfg.fp8_backward:
        line += "; input gradients in FP8" + (", and the forward (exploratory)" if v["fp8"] == "all" else "")
    if v["keep"] is not None:
        cfg = replace(cfg, gradient_checkpointing=v["keep"] < arch.num_layers,
                      recompute_layers=max(arch.num_layers - v["keep"], 0))
        line += f"; overridden: {v['keep']} of {arch.num_layers} layers keep their activations"
    torch.manual_seed(0)
    m = setup.backend.load(cfg, setup.model_path, setup.device)
    use_sft_head(m, cfg.lm_head)
    if v["fp8"] == "all":
        for module in m.modules():
            if hasattr(module, "_fp8"):
                module._fp8 = "all"
    est = estimate_peak(arch, cfg.per_device_train_batch_size, SEQ, LORA_R, setup.backend.name,
                        cfg.gradient_checkpointing, fused_loss=setup.backend.fused_loss,
                        eager_attention=cfg.attn_implementation == "eager", fp32_embeddings=cfg.fp32_norms_and_embeddings,
                        recompute_layers=cfg.recompute_layers if cfg.gradient_checkpointing else 0, optim=cfg.optim,
                        recompute_act=recompute_act_for(cfg, setup.backend.name, arch))
    return (m, cfg.per_device_train_batch_size, v["chat"] and cfg.packing,
            f"{setup.backend.label}, {cfg.attn_implementation}: {line}", est.peak_gib)


# ------------------------------------------------------------------------------------------------ data

def chat_lengths(n: int, seed: int = 0) -> list[int]:
    """Lengths like real SFT chat data: log-normal, median CHAT_MEDIAN tokens, capped at SEQ (at least 16)."""
    import random

    rng = random.Random(seed)
    return [max(16, min(SEQ, int(round(rng.lognormvariate(math.log(CHAT_MEDIAN), CHAT_SIGMA))))) for _ in range(n)]


def _sample(length: int, vocab: int, seed: int) -> tuple[list[int], int]:
    """A sample: a random 64-token motif repeated (learnable, so the loss moves), and where its loss starts."""
    import random

    rng = random.Random(seed)
    motif = [rng.randrange(3, vocab) for _ in range(64)]
    ids = (motif * (length // 64 + 1))[:length]
    return ids, max(1, int(length * CHAT_PROMPT_SHARE))


def step_batches(step: int, v: dict, micro_batch: int, packed: bool, vocab: int) -> list[dict]:
    """The micro-batches of optimizer step `step`: same samples for every variant. Each dict holds lists:
    input_ids, labels (-100: no loss), and position_ids (packed) or attention_mask (padded)."""
    if not v["chat"]:
        rows = [_sample(SEQ, vocab, 1000 * step + i)[0] for i in range(ROWS_PER_STEP)]
        return [{"input_ids": rows[i:i + micro_batch], "labels": rows[i:i + micro_batch]}
                for i in range(0, ROWS_PER_STEP, micro_batch)]
    lengths = chat_lengths(CHAT_SAMPLES_PER_STEP, seed=step)
    samples = [_sample(n, vocab, 1000 * step + i) for i, n in enumerate(lengths)]
    if packed:  # as the recipe's trainer collates them: a micro-batch's rows as one row, no padding
        rows = pack_rows(samples)
        batches = [collate(rows[i:i + micro_batch]) for i in range(0, len(rows), micro_batch)]
        if v.get("posids"):  # exploratory: boundaries from position_ids only, as trl < 1.16 leaves them
            from training.data import without_boundaries

            batches = [without_boundaries(b) for b in batches]
        return batches
    samples.sort(key=lambda s: -len(s[0]))  # group_by_length: similar lengths share a micro-batch
    out = []
    for i in range(0, len(samples), micro_batch):
        group = samples[i:i + micro_batch]
        width = len(group[0][0])
        out.append({"input_ids": [ids + [0] * (width - len(ids)) for ids, _ in group],
                    "labels": [[-100] * start + ids[start:] + [-100] * (width - len(ids)) for ids, start in group],
                    "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in group]})
    return out


def pack_rows(samples: list[tuple[list[int], int]]) -> list[dict]:
    """TRL's best-fit-decreasing packing (what the recipe's SFTTrainer does with packing=true): rows of at most SEQ
    tokens, each with its samples' lengths; no loss on a sample's prompt."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_dict({"input_ids": [ids for ids, _ in samples],
                            "labels": [[-100] * start + ids[start:] for ids, start in samples]})
    return [{"input_ids": row["input_ids"], "labels": row["labels"], "seq_lengths": row["seq_lengths"]}
            for row in pack_dataset(ds, SEQ, strategy="bfd")]


def collate(rows: list[dict]) -> dict:
    """A packed micro-batch as the recipe's trainer collates it (training.data.collate_packed; from trl 1.16 with the
    samples' boundaries). Its PACKED_KEYS come back as lists (the accounting reads them)."""
    from training.data import PACKED_KEYS, collate_packed

    out = collate_packed(rows)
    return {k: val.tolist() if k in PACKED_KEYS else val for k, val in out.items()}


# ------------------------------------------------------------------------------------------------ accounting

def useful_flops(arch, batch: dict) -> float:
    """Useful work of one micro-batch, frozen base: forward (2 FLOPs per parameter per token) plus input gradients
    (2 more), over real (loss-bearing) tokens only, plus attention over each sample's own causal context (QK^T and
    PV, 4 * heads * head_dim per context token and layer; backward counted as twice the forward). Recompute,
    padding and LoRA's own small matmuls are not counted."""
    base_params = arch.linear_params() + arch.hidden * arch.vocab
    real = sum(1 for row in batch["labels"] for t in row if t != -100)
    per_ctx = 4 * arch.heads * arch.head_dim * arch.num_layers
    attn = 0.0
    for i, row in enumerate(batch["labels"]):
        for length in sample_lengths(batch, i):
            attn += per_ctx * length * (length + 1) / 2
    return 4.0 * base_params * real + 3.0 * attn


def sample_lengths(batch: dict, row: int) -> list[int]:
    """The samples' lengths in one row (padding excluded)."""
    if "position_ids" in batch:
        starts = [i for i, p in enumerate(batch["position_ids"][row]) if p == 0] + [len(batch["position_ids"][row])]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        if any(t != -100 for t in batch["labels"][row][starts[-2]:]) or len(lengths) == 1:
            return lengths
        return lengths[:-1]  # the trailing padding "sample"
    if "attention_mask" in batch:
        return [sum(batch["attention_mask"][row])]
    return [len(batch["input_ids"][row])]


def real_tokens(batches: list[dict]) -> int:
    return sum(1 for b in batches for row in b["labels"] for t in row if t != -100)


def all_tokens(batches: list[dict]) -> int:
    return sum(len(row) for b in batches for row in b["input_ids"])


def matmul_tflops(device: str) -> float:
    """Measured dense bf16 matmul rate of this card (the MFU denominator)."""
    import torch

    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t) / 1e12


# ------------------------------------------------------------------------------------------------ profile

# kernel-name fragments -> category, first match wins, any case (CUDA kernels of one profiled optimizer step)
CATEGORIES = (
    ("loss (TRL's fused head)", ("trl:",)),  # TRL's kernels are named _forward_kernel/_backward_kernel: see below
    ("attention", ("flex", "triton_tem", "flash", "fmha", "attention")),
    ("loss (Liger)", ("cross_entropy", "fused_linear")),  # before gemm: Liger's CuTe DSL kernels are kernel_cutlass_*
    ("norm/act/rope (Liger)", ("rms_norm", "geglu", "rope", "swiglu")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "ampere_")),
    ("nf4 dequant", ("kDequantize", "dequantize")),
    ("optimizer (AdamW)", ("optimizer", "fusedadam", "adamw")),  # bitsandbytes' kOptimizer*, torch's FusedAdamW
)
# host-side ops that wait for the GPU (a `.item()`, a `bool(tensor)`, a nonzero) and the runtime's own waits
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile_step(model, params, opt, batches, dev) -> dict:
    """One more optimizer step under torch.profiler: device time by kernel category, the 12 costliest kernels, the
    share of the wall time the GPU was busy (the rest: launch gaps, host work, waits), and the host-device syncs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _, wall = optimizer_step(model, params, opt, batches, dev)
    kernels: dict[str, float] = {}
    syncs = dict.fromkeys(SYNC_OPS, 0)
    sources: dict[str, int] = {}  # who waited: the outermost and the innermost op around each sync
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time / 1e6  # seconds
        elif e.name in syncs:
            syncs[e.name] += 1
            chain, parent = [], getattr(e, "cpu_parent", None)
            while parent is not None:
                chain.append(parent.name)
                parent = getattr(parent, "cpu_parent", None)
            where = f"{chain[-1]} > {chain[0]}" if len(chain) > 1 else (chain[0] if chain else "(top level)")
            source = f"{e.name} in {where}"[:160]
            sources[source] = sources.get(source, 0) + 1
    busy = sum(kernels.values())
    cats: dict[str, float] = {}
    for name, sec in kernels.items():
        key = f"trl:{name}" if name in ("_forward_kernel", "_backward_kernel") else name  # exact: Liger has *_kernel
        cat = next((c for c, frags in CATEGORIES if any(f.lower() in key.lower() for f in frags)), "other")
        cats[cat] = cats.get(cat, 0.0) + sec
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    # the host's own time by op (compilation, autotuning and shape-keyed caches show here, not in the kernels)
    host = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda kv: -kv[1])[:10]
    return {"wall_s": round(wall, 3), "gpu_busy_s": round(busy, 3), "host_syncs": syncs,
            "host_self_s": [[n[:110], round(sec, 4)] for n, sec in host],
            "sync_sources": dict(sorted(sources.items(), key=lambda kv: -kv[1])[:8]),
            "by_category_s": {c: round(sec, 3) for c, sec in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [[n[:110], round(sec, 4)] for n, sec in top]}


# ------------------------------------------------------------------------------------------------ one variant

def optimizer_step(model, params, opt, batches: list[dict], dev) -> tuple[float, float]:
    """One optimizer step the Trainer's way (bf16 autocast on CUDA, accumulation over the micro-batches, clipping at
    0.3, the row's AdamW; the project's model through the recipe's LM head): (loss, seconds), timed between CUDA
    synchronisations."""
    import torch

    cuda = dev.type == "cuda"
    from training.lm_head import labelled_positions_loss

    head = getattr(model, "sft_head", None)  # the project path: use_sft_head
    tensors = [{k: torch.tensor(val, device=dev) if isinstance(val, list) else
                val.to(dev) if torch.is_tensor(val) else val for k, val in b.items()} for b in batches]
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    total = 0.0
    for b in tensors:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            if head == "liger":
                loss = labelled_positions_loss(model, b)[0] / len(tensors)
            else:
                loss = model(**b, **({"fused_lm_head": True} if head == "trl" else {})).loss / len(tensors)
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return total, time.perf_counter() - t


def run_variant(name: str, root: Path, steps: int, warmup: int, device: str) -> dict:
    """Runs in a child process: load, then warm-up + timed optimizer steps, the Trainer's way."""
    import bitsandbytes as bnb
    import torch

    from training.plan import Arch

    v = parse_variant(name)
    steps = v["steps"] or steps
    path = model_dir(v["shape"], root, device)
    arch = Arch.from_config(json.loads((path / "config.json").read_text()))
    os.environ.update(liger_env(v))  # Liger's per-op choice, read at each call (the recipe keeps a user's own)
    t_load = time.perf_counter()
    m, bs, packed, desc, predicted = load_variant(v, path, device)
    load_s = time.perf_counter() - t_load
    if v["liger_cute"]:
        desc += "; Liger's CuTe DSL RoPE by name"
    if v["compile"]:  # one compiled graph shared by every layer (parameters are graph inputs, not guards)
        for layer in m.get_base_model().model.layers:
            layer.compile(dynamic=False)
        desc += "; decoder layers under torch.compile"
    print(f"loaded in {load_s:.0f}s: {desc}", file=sys.stderr, flush=True)
    m.train()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the peak a user hits includes the first steps
    params = [p for p in m.parameters() if p.requires_grad]
    if optim_of(v) == "adamw_torch_fused":  # one multi-tensor kernel for every LoRA tensor
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2, fused=cuda)
        desc += "; fused 32-bit AdamW"
    elif v["path"] == "project" and not v["bnb8"]:  # the recipe's adamw_8bit (weight decay 1e-2 as above)
        from training.optim import FlatAdamW8bit

        opt = FlatAdamW8bit(params, **ADAMW_8BIT)
    else:  # the peers' users' adamw_8bit: bitsandbytes' own, one tensor at a time
        opt = bnb.optim.AdamW8bit(params, **ADAMW_8BIT)
        desc += "; bitsandbytes' per-tensor 8-bit AdamW" if v["path"] == "project" else ""
    if v["nosync"]:  # its non-paged updates run on the default stream, as the whole step does here: ordered anyway
        import bitsandbytes.optim.optimizer as bnb_optimizer

        bnb_optimizer.sync_gpu = lambda t: None
        desc += "; 8-bit AdamW without its per-parameter torch.cuda.synchronize()"
    dev = next(p.device for p in params)
    losses, times, reals, alls, flops = [], [], [], [], []
    # the caching allocator per step (the batch's copies to the card included): cudaMalloc calls, and retries (every
    # cached block freed, then cudaMalloc again: a stall) when a step needs more than the cache holds; variable-length
    # chat batches are where it can bite
    allocator = {"retries": [], "cuda_mallocs": []}

    def counts():
        stats = torch.cuda.memory_stats() if cuda else {}
        return stats.get("num_alloc_retries", 0), stats.get("num_device_alloc", 0)
    for step in range(warmup + steps):
        batches = step_batches(step, v, bs, packed, arch.vocab)
        before = counts()
        total, seconds = optimizer_step(m, params, opt, batches, dev)
        after = counts()
        allocator["retries"].append(after[0] - before[0])
        allocator["cuda_mallocs"].append(after[1] - before[1])
        times.append(seconds)
        losses.append(round(total, 5))
        reals.append(real_tokens(batches))
        alls.append(all_tokens(batches))
        flops.append(sum(useful_flops(arch, b) for b in batches))
        print(f"step {step}: loss {total:.4f} {times[-1]:.2f}s", file=sys.stderr, flush=True)
    profiled = None
    if v["profile"]:  # a batch never run before (on chat data a new batch costs ~1 s more the first time it runs,
        # 2026-12-06: repeating the slowest step did not show where), as every step of a real run is
        fresh = warmup + steps
        profiled = {"step": fresh, **profile_step(m, params, opt, step_batches(fresh, v, bs, packed, arch.vocab), dev)}
    timed = slice(warmup, None)
    t_sum = sum(times[timed])
    rate = matmul_tflops(device)
    useful = sum(flops[timed]) / t_sum / 1e12
    return dict(variant=name, desc=desc, micro_batch=bs, accumulation=len(batches), packed=packed,
                step_s=round(statistics.median(times[timed]), 3), tokens_per_s=round(sum(alls[timed]) / t_sum),
                real_tokens_per_s=round(sum(reals[timed]) / t_sum), real_share=round(sum(reals) / sum(alls), 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                predicted_peak_gib=predicted, useful_tflops=round(useful, 1),
                mfu=round(useful / rate, 3) if rate == rate else None, matmul_tflops=round(rate) if rate == rate else None,
                losses=losses, step_times=[round(t, 3) for t in times], load_s=round(load_s, 1), first_step_s=round(times[0], 1),
                gpu=torch.cuda.get_device_name() if cuda else "CPU", versions=versions(),
                **({"allocator": allocator} if cuda else {}),
                **({"profile": profiled} if profiled else {}))


def run_recipe(name: str, root: Path, steps: int, device: str) -> dict:
    """The whole recipe, as a user starts it, on the same 2048-token rows (text format, packed): tokens/s from its
    metrics.jsonl (median of the steps after the first two)."""
    v = parse_variant(name)
    path = model_dir(v["shape"], root, device)
    if v["window"]:  # -wN: a window the 2048-token rows outgrow, so the recipe checks and runs FA4's windowed kernel
        path = with_window(path, v["window"])
    work = root / f"recipe-{v['shape']}"
    data = work / "rows.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    if not data.is_file():  # long enough texts that each fills rows of 2048 tokens with the tiny tokenizer
        words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
        with data.open("w") as f:
            for i in range(200):
                f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(1500))}) + "\n")
    preset = "gemma-9b" if v["shape"] == "9b" else "gemma-2b"
    cmd = [sys.executable, "-m", "training.qlora_finetune", "--model-config", preset, "--model", str(path),
           "--data", str(data), "--run-name", name, "--output-dir", str(work / "out"), "--logs-dir", str(work / "logs"),
           "--resume", "never", "--max-steps", str(steps + 2), "--set", "logging_steps=1", "--set", "save_steps=1000",
           "--set", "eval_fraction=0", "--set", "report_to=none", "--set", f"gpu_mem_gib={v['gpu_mem'] or 0}"]
    if v["attention"] != "auto":  # -fa4 / -flex: by name, as a user asks for it (the recipe refuses one that fails its check)
        cmd += ["--set", f"attn_implementation={v['attention']}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **liger_env(v)})
    sys.stderr.write(proc.stderr)  # the recipe's own log (attention choice, self-checks) goes into the row's log
    if proc.returncode != 0:
        raise RuntimeError(f"recipe exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(x) for x in (work / "logs" / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and r.get("step", 0) > 2 and "event" not in r]
    def logged(marker: str) -> str:  # the recipe's first log line with this marker, after its level
        return next((ln.split("INFO ", 1)[-1] for ln in proc.stderr.splitlines() if marker in ln), "")

    plan, attention, head = logged("planner"), logged("INFO attention "), logged("INFO lm head ")
    steps_logged = [r for r in rows if "loss" in r and "event" not in r]
    accuracy = [r["mean_token_accuracy"] for r in steps_logged if "mean_token_accuracy" in r]  # either head logs it
    return dict(variant=name, desc=f"python -m training.qlora_finetune --model-config {preset}: {plan}; {attention}; "
                f"{head}; mean_token_accuracy logged at {len(accuracy)} of {len(steps_logged)} steps",
                tokens_per_s=round(statistics.median(rates)) if rates else None, wall_s=round(time.perf_counter() - t),
                mean_token_accuracy=accuracy[-1] if accuracy else None)


# ------------------------------------------------------------------------------------------------ report

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "unsloth", "triton"):
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "-"
    return out


def write_markdown(results: list[dict], out: Path, command: str) -> None:
    """Prepends one section (this call) to docs/benchmarks.md."""
    def key(r):  # rows compare with the baseline of their shape and data
        v = parse_variant(r["variant"])
        return v["shape"], v["chat"]

    base = {key(r): r for r in results if r["variant"].startswith("baseline") and "error" not in r}
    gpu = next((r["gpu"] for r in results if r.get("gpu")), "GPU")
    lines = [f"## {gpu} — {dt.date.today().isoformat()}", "", f"Command: `{command}`  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
             "| variant | micro-batch x accum | tokens/s | real tokens/s | vs baseline (real) | peak GiB | planner GiB (err) "
             "| useful MFU | loss: first, last (vs baseline) | what |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | | failed | | | | | | | {r['error'][:200]} |")
            continue
        if "losses" not in r:  # a recipe row
            lines.append(f"| {r['variant']} | | {r['tokens_per_s']:,} | | | | | | | {r['desc']} |")
            continue
        b = base.get(key(r))
        speed = f"{r['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}x" if b else "-"
        curve = f"{r['losses'][0]}, {r['losses'][-1]}"
        if b and len(b["losses"]) == len(r["losses"]):
            worst = max(abs(x / y - 1) for x, y in zip(r["losses"], b["losses"]))
            curve += f" (max {100 * worst:.2f}% off)"
        err = f" ({100 * (r['predicted_peak_gib'] / r['peak_gib'] - 1):+.0f}%)" if r.get("peak_gib") else ""
        lines.append(f"| {r['variant']} | {r['micro_batch']} x {r['accumulation']} | {r['tokens_per_s']:,} | "
                     f"{r['real_tokens_per_s']:,} | {speed} | {r['peak_gib']} | {r['predicted_peak_gib']}{err} | "
                     f"{r['mfu']} | {curve} | {r['desc']} |")
    rate = next((r["matmul_tflops"] for r in results if r.get("matmul_tflops")), None)
    lines += ["", f"Card's measured dense bf16 matmul rate: {rate} TFLOP/s (the MFU denominator)." if rate else ""]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.exists() else "# Benchmarks\n\nWritten by `scripts/benchmark.py`; newest first.\n"
    head, sep, rest = old.partition("\n## ")
    out.write_text(head.rstrip() + "\n\n" + text + (sep + rest if sep else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation, autotuning)")
    p.add_argument("--models-dir", default="/tmp/qlora-bench-models")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--json-out", help="also write the raw results here (rewritten after every variant)")
    p.add_argument("--variant-timeout", type=int, default=900, help="seconds before a variant counts as failed")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)  # cpu: tests only
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    root = Path(args.models_dir)
    root.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    for n in names:
        parse_variant(n)  # a typo fails now, not after an hour of GPU time
    if args.one:
        v = parse_variant(args.one)
        result = (run_recipe(args.one, root, args.steps, args.device) if v["path"] == "recipe" else
                  run_variant(args.one, root, args.steps, args.warmup, args.device))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU (it measures GPU speed and memory)", file=sys.stderr)
        return 2
    # Packages the project's own install resolves to where they differ from the peer's (the device's site: unsloth
    # pins trl <= 1.15, the default GPU image gets the newest trl): put first for the project and recipe rows only
    project_site = os.environ.get("QLORA_BENCH_PROJECT_SITE", "")
    results = []
    env = {**os.environ, "UNSLOTH_COMPILE_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    logs = Path(args.json_out).with_suffix(".logs") if args.json_out else None  # each row's own log, beside the rows
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        print(f"== {name}", flush=True)
        run_env = dict(env)
        if project_site and parse_variant(name)["path"] in ("project", "recipe"):
            run_env["PYTHONPATH"] = os.pathsep.join(filter(None, (project_site, env.get("PYTHONPATH"))))
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup",
                                   str(args.warmup), "--models-dir", str(root), "--device", args.device,
                                   "--variants", name], capture_output=True, text=True, env=run_env,
                                  timeout=args.variant_timeout)
        except subprocess.TimeoutExpired as exc:
            text = [x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr)]
            proc = subprocess.CompletedProcess(exc.cmd, -9, text[0], text[1] + f"\ntimed out after {exc.timeout}s")
        if logs:  # warnings, the recipe's own log, TORCH_LOGS=recompiles
            (logs / f"{i:02d}-{name}.stderr").write_text(proc.stderr or "")
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line:
            results.append(json.loads(line[7:]))
            print(json.dumps(results[-1]), f"({time.perf_counter() - t:.0f}s)", flush=True)
        else:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"variant": name, "error": err})
            print(f"   failed: {proc.stderr[-2500:]}", flush=True)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1))
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_markdown(results, Path(args.out), command.strip())
    print(Path(args.out).read_text().split("\n## ")[1][:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
