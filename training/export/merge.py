"""The merge: the base reloaded in its own precision, the run's adapter applied and merged, saved with the tokenizer
files llama.cpp's converter reads, and checked (the saved merged model says what adapter-on-base says). A complete
earlier merge of the same adapter, base and precision is reused."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from pathlib import Path

from training.export.checks import check_prompts, compare_logits, load_causal_lm, prompt_logits, within
from training.export.converter import sha256
from training.export.errors import CheckFailed, ExportError
from training.export.quants import MERGE_LIMITS
from training.export.run import read_json
from training.jsonio import write_json_atomic
from training.runfiles import ADAPTER_DIR, MERGE_INFO, RUN_SUMMARY

log = logging.getLogger(__name__)

MERGE_FORMAT = 2  # bump when what merge_adapter writes changes: an older merged/ folder is then merged again
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's, in adapter/


def adapter_fingerprint(adapter_dir: Path) -> str:
    return sha256(adapter_dir / ADAPTER_WEIGHTS)


def sentencepiece_family(base_path: Path) -> bool:
    """Gemma's tokenizer is SentencePiece: its GGUF needs tokenizer.model, which transformers 5 does not save."""
    return str(read_json(base_path / "config.json").get("model_type", "")).startswith("gemma")


def reusable_merge(merged_dir: Path, run_dir: Path, base_path: Path, dtype: str) -> dict | None:
    """A complete earlier merge of the same adapter, base and precision (exporting another quant reuses it)."""
    info = read_json(merged_dir / MERGE_INFO) if (merged_dir / MERGE_INFO).is_file() else {}
    if (info.get("merge_format") == MERGE_FORMAT and info.get("dtype") == dtype
            and info.get("base_path") == str(base_path.resolve())
            and info.get("adapter_sha256") == adapter_fingerprint(run_dir / ADAPTER_DIR)
            and info.get("merged_vs_adapter_on_base", {}).get("passed")):
        return info
    return None


def merge_or_reuse(run_dir: Path, base_name: str, base_path: Path, dtype: str, merged_dir: Path,
                   reuse: dict | None, compare_trained: bool) -> dict:
    """The merge info of `reuse` (a reusable earlier merge), or of a new merge; its numbers logged."""
    if reuse is not None:
        log.info("reusing the merge in %s (same adapter, base and precision)", merged_dir)
        return reuse
    log.info("merging the adapter into the base in %s ...", dtype)
    info = merge_adapter(run_dir, base_name, base_path, dtype, merged_dir, compare_trained=compare_trained)
    c = info["merged_vs_adapter_on_base"]
    log.info("merged into %s: vs adapter-on-base top-1 %.3f, max logit diff %.2g (%.2g sd)", merged_dir,
             c["top1_agreement"], c["max_logit_diff"], c["max_logit_diff_sd"])
    t = info.get("merged_vs_trained_4bit", {})
    if "top1_agreement" in t:
        log.info("vs the model as trained (4-bit base + adapter): top-1 %.3f, max logit diff %.2g sd "
                 "(the base's NF4 rounding, left out of the export)", t["top1_agreement"], t["max_logit_diff_sd"])
    return info


def merge_adapter(run_dir: Path, base_name: str, base_path: Path, dtype: str, merged_dir: Path,
                  compare_trained: bool = True) -> dict:
    """Base in `dtype` + adapter -> merged model in merged_dir (temp folder, renamed when saved and checked)."""
    adapter_dir = run_dir / ADAPTER_DIR
    spm = _sentencepiece_file(adapter_dir, base_name, base_path)
    t0 = time.time()
    tokenizer = _adapter_tokenizer(adapter_dir)
    _, ids = check_prompts(tokenizer)
    model, base = _adapter_on_base(adapter_dir, base_path, dtype)
    adapter_logits = prompt_logits(model, ids)
    merged = model.merge_and_unload()
    tmp = merged_dir.with_name(f".{merged_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_added_tokens_decoder(tokenizer, tmp / "tokenizer_config.json")
        if spm is not None:
            shutil.copyfile(spm, tmp / "tokenizer.model")
        del model, merged, base
        gc.collect()
        t_merge = time.time() - t0
        # the saved files, reloaded, must say what adapter-on-base said
        merged_logits, cmp = _check_saved_merge(tmp, dtype, ids, adapter_logits)
        info = {"merge_format": MERGE_FORMAT, "base": base_name, "base_path": str(base_path.resolve()), "dtype": dtype,
                "adapter_sha256": adapter_fingerprint(adapter_dir), "merged_vs_adapter_on_base": cmp,
                "merge_seconds": round(t_merge, 2)}
        if compare_trained:
            info["merged_vs_trained_4bit"] = compare_with_trained(run_dir, base_path, ids, merged_logits)
        info["check_seconds"] = round(time.time() - t0 - t_merge, 2)
        write_json_atomic(tmp / MERGE_INFO, info)  # written last: its presence means a complete merge
        replace_dir(tmp, merged_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _sentencepiece_file(adapter_dir: Path, base_name: str, base_path: Path) -> Path | None:
    """llama.cpp's converter reads a SentencePiece model (Gemma) from tokenizer.model, a BPE one (Llama 3, SmolLM2,
    Qwen...) from tokenizer.json: the tokenizer.model to copy (None for BPE), or a clear error when it is missing."""
    spm = next((p for p in (adapter_dir / "tokenizer.model", base_path / "tokenizer.model") if p.is_file()), None)
    if spm is None and sentencepiece_family(base_path):
        raise ExportError(f"no tokenizer.model in {adapter_dir} or {base_path}: GGUF conversion of this "
                          f"SentencePiece model ({read_json(base_path / 'config.json').get('model_type')}) needs the "
                          "SentencePiece file.\n-> copy tokenizer.model from the base model's files (the Hugging Face "
                          f"repo of {base_name}) into {adapter_dir}/")
    if spm is None and not (adapter_dir / "tokenizer.json").is_file():
        raise ExportError(f"{adapter_dir} has neither tokenizer.model nor tokenizer.json: GGUF conversion needs the "
                          "tokenizer's files.\n-> re-save the base model's tokenizer into that folder")
    return spm


def _adapter_tokenizer(adapter_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if not tokenizer.chat_template:
        raise ExportError(f"{adapter_dir} has no chat template (chat_template.jinja / tokenizer_config.json).\n-> "
                          "re-save the tokenizer of the base model with its chat template into that folder")
    return tokenizer


def _adapter_on_base(adapter_dir: Path, base_path: Path, dtype: str):
    """(the adapter on the base in `dtype`, the base); an adapter that does not fit the base is a clear error."""
    from peft import PeftModel

    base = load_causal_lm(base_path, dtype)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the adapter in {adapter_dir} does not fit the base {base_path}: {first[:300]}\n-> pass "
                          f"--base with the model the run was trained on ({RUN_SUMMARY}: config."
                          "model_name_or_path)") from None
    return model.eval(), base


def _check_saved_merge(folder: Path, dtype: str, ids: list[list[int]], adapter_logits: list) -> tuple[list, dict]:
    """The saved merged model reloaded: its logits, and their comparison with adapter-on-base (CheckFailed when
    outside the merge limits)."""
    reloaded = load_causal_lm(folder, dtype)
    merged_logits = prompt_logits(reloaded, ids)
    del reloaded
    gc.collect()
    cmp = within(compare_logits(adapter_logits, merged_logits), *MERGE_LIMITS[dtype])
    if not cmp["passed"]:
        raise CheckFailed(f"the merged model does not say what adapter-on-base says: top-1 agreement "
                          f"{cmp['top1_agreement']:.3f} (limit {cmp['limit_top1']}), max logit difference "
                          f"{cmp['max_logit_diff_sd']:.3g} sd (limit {cmp['limit_max_logit_diff_sd']})")
    return merged_logits, cmp


def compare_with_trained(run_dir: Path, base_path: Path, ids: list[list[int]], merged_logits: list) -> dict:
    """Informational: the model as trained (base in 4-bit with the run's settings + adapter) vs the merged one.
    The difference is the NF4 rounding of the base that the export leaves out; it has no limit."""
    import torch

    cfg = read_json(run_dir / RUN_SUMMARY).get("config", {})
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.get("bnb_4bit_quant_type", "nf4"),
                                   bnb_4bit_use_double_quant=cfg.get("bnb_4bit_use_double_quant", True),
                                   bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(str(base_path), quantization_config=quant, dtype=torch.float32,
                                                    attn_implementation="eager", device_map={"": "cpu"})
        model = PeftModel.from_pretrained(base, str(run_dir / ADAPTER_DIR)).eval()
        trained = prompt_logits(model, ids)
        del model, base
        gc.collect()
    except Exception as exc:  # noqa: BLE001 - informational only: say why and go on
        return {"skipped": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    return {**compare_logits(trained, merged_logits), "note": "informational, no limit: NF4 rounding of the base"}


def write_added_tokens_decoder(tokenizer, config_path: Path) -> None:
    """transformers 5 no longer writes `added_tokens_decoder` nor `add_bos_token` into tokenizer_config.json, and
    llama.cpp's converter reads them: without the first, <start_of_turn>/<end_of_turn> become plain text pieces in
    the GGUF and llama.cpp / Ollama split them into characters; the second says whether llama.cpp adds <bos>
    (Ollama's templates leave it to the runtime). Write both back from the tokenizer's actual behaviour."""
    cfg = read_json(config_path)
    if not cfg.get("added_tokens_decoder"):
        special = set(tokenizer.all_special_tokens)
        cfg["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": bool(t.special or t.content in special)}
            for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    probe = tokenizer("a")["input_ids"]
    cfg.setdefault("add_bos_token", wants_bos(tokenizer))
    cfg.setdefault("add_eos_token", bool(probe) and probe[-1] == tokenizer.eos_token_id)
    write_json_atomic(config_path, cfg)


def wants_bos(tokenizer) -> bool:
    """Whether prompts start with <bos>: the tokenizer adds it, or the chat template writes it (Gemma's does; Ollama's
    Go template does not, so the GGUF must tell llama.cpp to add it)."""
    if tokenizer.bos_token_id is None:
        return False
    if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return True
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                             tokenize=False)
    # ChatML's <|im_start|> is SmolLM2's bos_token but opens every turn: Ollama's template writes it, llama.cpp must not
    return rendered.startswith(tokenizer.bos_token) and rendered.count(tokenizer.bos_token) == 1


def replace_dir(tmp: Path, target: Path) -> None:
    """Put a finished folder in place; an older one is renamed away first, then deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".trash-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
