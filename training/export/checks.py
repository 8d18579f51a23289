"""What proves the export: fixed prompts through two models and their logits compared (merged vs adapter-on-base,
GGUF vs merged), and the GGUF's metadata, tensors and tokenizer against the merged model's config."""

from __future__ import annotations

import json
from pathlib import Path

from training.export.quants import QUANTS
from training.export.run import safetensors_headers

# Fixed prompts, chat-formatted with the run's own template: the same token ids go through both models.
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "What is QLoRA, in one sentence?"}],
    [{"role": "user", "content": "Write a haiku about a GPU."},
     {"role": "assistant", "content": "Fans hum in the dark,\nmatrices bloom into light,\nthe loss curve bends down."},
     {"role": "user", "content": "Now one about checkpoints."}],
    [{"role": "user", "content": "Translate to French: the cat sleeps on the warm laptop."}],
    [{"role": "user", "content": "List three prime numbers greater than 100, then explain why 2 is prime."}],
]


def load_causal_lm(path: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    # eager attention keeps Gemma-2's attention logit soft-capping, which llama.cpp implements too
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), attn_implementation="eager",
                                                 device_map={"": "cpu"})
    return model.eval()


def check_prompts(tokenizer) -> tuple[list[str], list[list[int]]]:
    """The fixed conversations as text (chat template applied) and as the HF tokenizer's ids."""
    texts, ids = [], []
    for conv in CHECK_CONVERSATIONS:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        texts.append(text)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return texts, ids


def prompt_logits(model, ids: list[list[int]]):
    import torch

    out = []
    with torch.inference_mode():
        for seq in ids:
            logits = model(input_ids=torch.tensor([seq])).logits[0]
            out.append(logits.float().numpy())
    return out


def compare_logits(ref: list, other: list) -> dict:
    """Top-1 agreement and max |difference| over every position and vocabulary entry; the difference also in
    standard deviations of the reference logits (scale-free)."""
    import numpy as np

    positions = agree = 0
    max_diff = 0.0
    for a, b in zip(ref, other):
        n = min(a.shape[-1], b.shape[-1])
        a, b = a[:, :n], b[:, :n]
        positions += a.shape[0]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        max_diff = max(max_diff, float(np.abs(a - b).max()))
    std = float(np.concatenate([a.reshape(-1) for a in ref]).std()) or 1.0
    return {"positions": positions, "top1_agreement": agree / max(positions, 1), "max_logit_diff": max_diff,
            "reference_logit_std": std, "max_logit_diff_sd": max_diff / std}


def within(cmp: dict, min_top1: float, max_diff_std: float) -> dict:
    return {**cmp, "limit_top1": min_top1, "limit_max_logit_diff_sd": max_diff_std,
            "passed": cmp["top1_agreement"] >= min_top1 and cmp["max_logit_diff_sd"] <= max_diff_std}


def expected_tensor_count(merged_dir: Path) -> int:
    """One GGUF tensor per safetensors tensor (llama-family / Gemma converters map 1:1); a tied lm_head is skipped."""
    return sum(1 for header in safetensors_headers(merged_dir) for k in header
               if k != "__metadata__" and k != "lm_head.weight")


def evaluate_checks(res: dict, expected: dict, quant: str) -> dict:
    """Turn the worker's measurements into named pass/fail checks."""
    q = QUANTS[quant]
    meta, cfg = res["metadata"], expected["config"]
    arch = meta["general.architecture"]
    want = {f"{arch}.block_count": cfg.get("num_hidden_layers"), f"{arch}.embedding_length": cfg.get("hidden_size"),
            f"{arch}.feed_forward_length": cfg.get("intermediate_size"),
            f"{arch}.attention.head_count": cfg.get("num_attention_heads"),
            f"{arch}.attention.head_count_kv": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
            f"{arch}.context_length": cfg.get("max_position_embeddings"), "vocab_size": cfg.get("vocab_size")}
    wrong = {k: {"gguf": meta.get(k), "config": v} for k, v in want.items() if v is not None and meta.get(k) != v}
    logits = res["logits"]
    checks = {
        "metadata": {"passed": not wrong and arch == expected["arch"], "architecture": arch,
                     "expected_architecture": expected["arch"], "mismatches": wrong},
        "tensor_count": {"passed": res["tensor_count"] == expected["tensors"]
                         and res["layers_with_tensors"] == cfg.get("num_hidden_layers"),
                         "gguf": res["tensor_count"], "expected": expected["tensors"],
                         "layers": res["layers_with_tensors"], "types": res["tensor_types"]},
        "tensors_finite": {"passed": not res["nonfinite_tensors"], "nonfinite": res["nonfinite_tensors"]},
        "chat_template": {"passed": (res["chat_template_in_gguf"] or "").strip() == expected["chat_template"].strip()},
        "tokenizer": {"passed": not res["tokenizer_mismatches"] and res["n_vocab_llama_cpp"] == cfg.get("vocab_size")
                      and res["bos_added_by_llama_cpp"] == expected["adds_bos"],
                      "n_vocab": res["n_vocab_llama_cpp"], "mismatches": res["tokenizer_mismatches"],
                      "bos_added_by_llama_cpp": res["bos_added_by_llama_cpp"], "bos_added_by_hf": expected["adds_bos"]},
        "logits_vs_merged": {**within(logits, q.min_top1, q.max_diff_std),
                             "reference_dtype": expected["reference_dtype"]},
    }
    return checks


def describe_check(name: str, c: dict) -> str:
    """One line for a failed check."""
    if name == "logits_vs_merged":
        return (f"top-1 agreement {c['top1_agreement']:.3f} (limit {c['limit_top1']}), max logit diff "
                f"{c['max_logit_diff_sd']:.3g} sd (limit {c['limit_max_logit_diff_sd']} sd)")
    if name == "metadata":
        return f"architecture {c['architecture']} (expected {c['expected_architecture']}), differing: {c['mismatches']}"
    if name == "tensor_count":
        return f"{c['gguf']} tensors in {c['layers']} layers, expected {c['expected']}"
    if name == "tensors_finite":
        return f"NaN/inf in {', '.join(c['nonfinite'][:5])}"
    if name == "chat_template":
        return "the GGUF's tokenizer.chat_template is missing or differs from the run's"
    if name == "tokenizer":
        return (f"{len(c['mismatches'])} prompt(s) tokenized differently by llama.cpp, n_vocab {c['n_vocab']}, "
                f"<bos> added by llama.cpp {c['bos_added_by_llama_cpp']} vs expected {c['bos_added_by_hf']}")
    return json.dumps(c, default=str)[:300]


def failed_checks_message(checks: dict, kept: Path) -> str:
    return ("the GGUF does not say what the merged model says:\n" +
            "\n".join(f"  {k}: {describe_check(k, v)}" for k, v in checks.items() if not v["passed"]) +
            f"\nfull report: {kept}")
