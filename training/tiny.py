"""The built-in tiny model: a Gemma-2-architecture causal LM of ~100k parameters and a SentencePiece tokenizer
like Gemma's (BPE, byte fallback, <start_of_turn>/<end_of_turn>), built locally and deterministically.

It is how the whole stack runs without a download or a GPU: the tiny preset trains it through the same 4-bit
QLoRA path as the real presets, and export converts it like a real Gemma. The result is cached under
`models/tiny-gemma2/` and rebuilt when missing or when BUILD_VERSION changes.

    python -m training.tiny [--dir models/tiny-gemma2] [--force]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path

from training.templates import GEMMA_CHAT_TEMPLATE

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny-gemma2"
BUILD_VERSION = 1  # bump when the architecture, tokenizer or corpus below changes


TINY_ARCH = dict(
    vocab_size=512,  # SentencePiece vocab below (256 byte-fallback pieces + merges + specials)
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    sliding_window=256,
    query_pre_attn_scalar=16,
    attn_logit_softcapping=50.0,  # Gemma-2's soft-capping, so the tiny path exercises it too
    final_logit_softcapping=30.0,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_dir() -> Path:
    return Path(os.environ.get("TINY_MODEL_DIR", "models/" + TINY_NAME))


def _corpus() -> list[str]:
    """Text the tokenizer learns from: the committed sample data plus chat-format markers."""
    lines: list[str] = []
    sample = repo_root() / "datasets" / "sample"
    for path in sorted(sample.glob("*")):
        if path.suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            for rec in (json.loads(line) for line in text.splitlines() if line.strip()) if path.suffix == ".jsonl" \
                    else json.loads(text):
                for value in _strings(rec):
                    lines.append(value)
    lines += ["<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n"] * 20
    lines += ["The quick brown fox jumps over the lazy dog. 0123456789"] * 5
    return lines


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        hard_vocab_limit=False, num_threads=1, minloglevel=2, seed_sentencepiece_size=100000,
    )
    return buf.getvalue()


def build_tiny_model(target: Path, force: bool = False) -> Path:
    """Build (or reuse) the tiny model folder: config, safetensors weights, tokenizer files incl. tokenizer.model."""
    target = Path(target)
    stamp = target / "tiny_build.json"
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("build_version") == BUILD_VERSION:
                return target
        except (OSError, json.JSONDecodeError):
            pass

    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaTokenizer

    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.model").write_bytes(_train_sentencepiece(TINY_ARCH["vocab_size"]))
    tokenizer = GemmaTokenizer.from_pretrained(str(tmp))
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(tmp))

    arch = dict(TINY_ARCH, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**arch)).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(tmp))
    (tmp / "tiny_build.json").write_text(json.dumps({"build_version": BUILD_VERSION,
                                                     "parameters": sum(p.numel() for p in model.parameters())}))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def resolve_builtin(name_or_path: str) -> str:
    """Map `builtin:tiny-gemma2` / `builtin:smollm2-135m` to its built folder; leave hub ids and paths alone."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    from training import real_model

    name = name_or_path[len(BUILTIN_PREFIX):]
    if name == real_model.SMOLLM2_NAME:
        return str(real_model.build_real_model(real_model.default_dir()))
    if name != TINY_NAME:
        raise ValueError(f"unknown built-in model '{name}'; the built-ins are '{BUILTIN_PREFIX}{TINY_NAME}' and "
                         f"'{BUILTIN_PREFIX}{real_model.SMOLLM2_NAME}'")
    return str(build_tiny_model(default_dir()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(default_dir()), help="where to build it (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a current build exists")
    args = parser.parse_args(argv)
    path = build_tiny_model(Path(args.dir), force=args.force)
    info = json.loads((path / "tiny_build.json").read_text())
    print(f"tiny model ready in {path} ({info['parameters']:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
