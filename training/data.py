"""Training data: load a file or a folder, detect each file's format, validate with file:line errors, split
deterministically, and tokenize with the model's chat template, masking everything but the answers.

Accepted files: `.jsonl`, `.json` (an array of objects), `.parquet`, `.csv`, or a folder written by
`datasets.Dataset.save_to_disk`. A folder may hold several files; each file has one format.

Formats (detected from the keys of each record):
  chat              {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
  sharegpt          {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
  alpaca            {"instruction": "...", "input": "... (optional)", "output": "..."}
  prompt_completion {"prompt": "...", "completion": "..."}
  text              {"text": "..."}
chat, sharegpt and alpaca become conversations rendered with the tokenizer's own chat template (a tokenizer without
one is refused: --set chat_template=PATH gives one, training/templates.py). Gemma's template
has no system role: a system message is folded into the first user turn ("SYSTEM\n\nUSER"), which is what
Google's own Gemma chat format recommends. The loss covers the assistant turns (chat) or the completion
(prompt_completion) only, unless `completion_only_loss` is false; `text` trains on every token.

    python -m training.data validate PATH [--model ID_OR_PATH] [--max-seq-length N]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from training.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion", "text")
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "model": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
IGNORE_INDEX = -100  # label value the loss ignores


class DataError(UserError, ValueError):
    """Bad training data; the message starts with file:line (or file:row N) and says how to fix it."""


@dataclass
class Record:
    where: str  # "path:line" or "path:row N", for error messages
    data: dict[str, Any]


@dataclass
class Example:
    """One normalised training example."""

    where: str
    fmt: str
    messages: list[dict[str, str]] | None = None  # chat, sharegpt, alpaca
    prompt: str | None = None  # prompt_completion
    completion: str | None = None
    text: str | None = None  # text

    def key(self) -> str:
        return json.dumps([self.messages, self.prompt, self.completion, self.text], sort_keys=True)


@dataclass
class DataStats:
    files: dict[str, str] = field(default_factory=dict)  # file -> format
    per_format: dict[str, int] = field(default_factory=dict)
    n_train: int = 0
    n_eval: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per example before truncation
    truncated: int = 0
    dropped_no_target: int = 0
    max_seq_length: int = 0

    def summary(self) -> dict[str, Any]:
        lengths = sorted(self.lengths) or [0]
        n = len(self.lengths)
        return {
            "files": self.files,
            "records_per_format": self.per_format,
            "train_examples": self.n_train,
            "eval_examples": self.n_eval,
            "tokens": {"min": lengths[0], "median": int(statistics.median(lengths)),
                       "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], "max": lengths[-1],
                       "total": sum(self.lengths)},
            "max_seq_length": self.max_seq_length,
            "truncated": self.truncated,
            "truncation_rate": round(self.truncated / n, 4) if n else 0.0,
            "dropped_no_target": self.dropped_no_target,
        }


# ----------------------------------------------------------------------------------------------- reading files

def find_data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'. Use one of: {', '.join(DATA_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path}: no data files found (looked for {', '.join(DATA_SUFFIXES)}, "
                            "or a folder written by datasets' save_to_disk)")
        return files
    raise DataError(f"{path}: no such file or folder. Put your training data there (.jsonl/.json/.parquet/.csv files), "
                    "or point at it with --data PATH (make: DATA=path)")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8-sig", newline=None) as fh:  # utf-8-sig: accept a BOM; newline=None: CRLF
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}). "
                                "Each line of a .jsonl file must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield Record(f"{path}:{lineno}", obj)


def read_json_array(path: Path) -> Iterator[Record]:
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON array of records, got a {type(data).__name__}. "
                        "Use a list [ {...}, {...} ] or a .jsonl file with one object per line")
    # Walk the array again to learn where each element starts, for file:line messages.
    pos = text.index("[") + 1
    for i in range(len(data)):
        while text[pos] in " \t\r\n,":
            pos += 1
        obj, end = decoder.raw_decode(text, pos)
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_of(pos)}: element {i} is a {type(obj).__name__}, expected an object")
        yield Record(f"{path}:{line_of(pos)}", obj)
        pos = end


def read_csv(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:  # reads the header line
            return
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            yield Record(f"{path}:{start}", {k: v for k, v in row.items() if k is not None})


def read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read Parquet file ({exc})") from None
    for i, row in enumerate(rows, 1):
        yield Record(f"{path}:row {i}", row)


def read_saved_dataset(path: Path) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: saved DatasetDict has splits {list(ds)}; it needs a 'train' split")
        ds = ds["train"]
    for i, row in enumerate(ds, 1):
        yield Record(f"{path}:row {i}", dict(row))


def read_records(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    reader = {".jsonl": read_jsonl, ".json": read_json_array, ".csv": read_csv, ".parquet": read_parquet}[suffix]
    try:
        yield from reader(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}). Re-save the file as UTF-8") from None


# --------------------------------------------------------------------------------------- formats and validation

def _maybe_json(value: Any) -> Any:
    """CSV and Parquet store nested conversations as JSON strings."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def detect_format(rec: Record) -> str:
    keys = {k for k, v in rec.data.items() if v is not None}
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(f"{rec.where}: unrecognised record with keys {sorted(rec.data)}. Expected one of: "
                    "'messages' (chat), 'conversations' (ShareGPT), 'instruction'+'output' (alpaca), "
                    "'prompt'+'completion', or 'text'")


def _require_str(rec: Record, key: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{rec.where}: '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{rec.where}: '{key}' is empty")
    return value


def _check_conversation(rec: Record, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not messages:
        raise DataError(f"{rec.where}: the conversation is empty")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise DataError(f"{rec.where}: message {i + (len(messages) - len(body))} has role '{msg['role']}' "
                            f"where '{expected}' was expected: turns must alternate user/assistant after an "
                            "optional leading system message")
    if not any(m["role"] == "assistant" for m in body):
        raise DataError(f"{rec.where}: no assistant message, so nothing to learn from this conversation")
    return messages


def normalise(rec: Record, fmt: str) -> Example:
    d = rec.data
    if fmt in ("chat", "sharegpt"):
        key, role_key, text_key, roles = (("messages", "role", "content", CHAT_ROLES) if fmt == "chat"
                                          else ("conversations", "from", "value", SHAREGPT_ROLES))
        raw = _maybe_json(d[key])
        if not isinstance(raw, list):
            raise DataError(f"{rec.where}: '{key}' must be a list of {{'{role_key}': ..., '{text_key}': ...}}")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or role_key not in m or text_key not in m:
                raise DataError(f"{rec.where}: {key}[{i}] must be an object with '{role_key}' and '{text_key}'"
                                f" (got {m!r:.80})")
            role = str(m[role_key]).lower()
            if role not in roles:
                raise DataError(f"{rec.where}: {key}[{i}] has unknown role '{m[role_key]}'. "
                                f"Known roles: {', '.join(sorted(roles))}")
            messages.append({"role": roles[role], "content": _require_str(rec, f"{key}[{i}].{text_key}",
                                                                            m[text_key], allow_empty=True)})
        return Example(rec.where, fmt, messages=_check_conversation(rec, messages))
    if fmt == "alpaca":
        instruction = _require_str(rec, "instruction", d["instruction"])
        extra = d.get("input") or ""
        extra = _require_str(rec, "input", extra, allow_empty=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(rec.where, fmt, messages=[{"role": "user", "content": user},
                                                 {"role": "assistant",
                                                  "content": _require_str(rec, "output", d["output"])}])
    if fmt == "prompt_completion":
        return Example(rec.where, fmt, prompt=_require_str(rec, "prompt", d["prompt"], allow_empty=True),
                       completion=_require_str(rec, "completion", d["completion"]))
    return Example(rec.where, fmt, text=_require_str(rec, "text", d["text"]))


def load_examples(data_path: str | Path, stats: DataStats | None = None) -> list[Example]:
    """Read every record under data_path, one format per file, and normalise it. Raises DataError."""
    stats = stats if stats is not None else DataStats()
    path = Path(data_path)
    sources: list[tuple[Path, Iterator[Record]]]
    if is_saved_dataset(path):
        sources = [(path, read_saved_dataset(path))]
    else:
        sources = [(f, read_records(f)) for f in find_data_files(path)]
    examples: list[Example] = []
    for file, records in sources:
        file_format, first_where, count = None, None, 0
        for rec in records:
            fmt = detect_format(rec)
            if file_format is None:
                file_format, first_where = fmt, rec.where
            elif fmt != file_format:
                raise DataError(f"{rec.where}: this record is {fmt} but {first_where} is {file_format}: mixed "
                                "formats in one file. Put each format in its own file")
            examples.append(normalise(rec, fmt))
            count += 1
        if count == 0:
            raise DataError(f"{file}:1: empty file (no records)")
        stats.files[str(file)] = file_format or ""
        stats.per_format[file_format] = stats.per_format.get(file_format, 0) + count
    return examples


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic split: an example's side depends only on its content and the seed, so adding data later
    does not reshuffle the existing evaluation set."""
    if eval_fraction <= 0:
        return examples, []
    train, held_out = [], []
    for ex in examples:
        h = int(hashlib.sha256(f"{seed}:{ex.key()}".encode()).hexdigest()[:8], 16) / 2**32
        (held_out if h < eval_fraction else train).append(ex)
    if not train:
        raise DataError("every example landed in the evaluation split; lower eval_fraction")
    return train, held_out


# ------------------------------------------------------------------------------------------------- tokenising

def supports_system_role(tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False)
        return True
    except Exception:  # Gemma's template raises "System role not supported"
        return False


def fold_system_message(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Gemma has no system role: prepend the system text to the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"].strip(), [dict(m) for m in messages[1:]]
    if system and rest:
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


class Tokenize:
    """Turn Examples into {'input_ids', 'labels'} with labels = -100 outside the trained spans."""

    def __init__(self, tokenizer, max_seq_length: int, completion_only_loss: bool = True):
        self.tok = tokenizer  # its own chat template (training/templates.py): never another family's
        self.max_len = max_seq_length
        self.completion_only = completion_only_loss
        self.fold_system = not supports_system_role(tokenizer)

    def _render(self, messages, generation_prompt=False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def chat(self, ex: Example) -> tuple[list[int], list[int]]:
        if not self.tok.chat_template:
            from training.templates import missing_template_message

            raise DataError(f"{ex.where}: {missing_template_message(self.tok.name_or_path)}")
        messages = fold_system_message(ex.messages) if self.fold_system else ex.messages
        try:
            full = self._render(messages)
            spans = []
            for i, msg in enumerate(messages):
                if msg["role"] != "assistant":
                    continue
                start = len(self._render(messages[:i], generation_prompt=True))
                end = len(self._render(messages[: i + 1]))
                spans.append((start, end))
        except Exception as exc:  # jinja raise_exception in the model's template
            raise DataError(f"{ex.where}: the model's chat template rejected this conversation: {exc}") from None
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(s <= off[0] < e for s, e in spans) else IGNORE_INDEX
                  for t, off in zip(ids, enc["offset_mapping"])]
        return ids, labels

    def prompt_completion(self, ex: Example) -> tuple[list[int], list[int]]:
        prompt = self.tok(ex.prompt, add_special_tokens=True)["input_ids"] if ex.prompt else \
            [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        completion = self.tok(ex.completion, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion

    def text(self, ex: Example) -> tuple[list[int], list[int]]:
        ids = self.tok(ex.text, add_special_tokens=True)["input_ids"] + [self.tok.eos_token_id]
        return ids, list(ids)

    def __call__(self, ex: Example) -> tuple[list[int], list[int]]:
        if ex.messages is not None:
            ids, labels = self.chat(ex)
        elif ex.completion is not None:
            ids, labels = self.prompt_completion(ex)
        else:
            ids, labels = self.text(ex)
        if not self.completion_only:
            labels = list(ids)
        return ids, labels


def tokenize_examples(examples: list[Example], tokenize: Tokenize, stats: DataStats) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for ex in examples:
        ids, labels = tokenize(ex)
        stats.lengths.append(len(ids))
        if len(ids) > tokenize.max_len:
            stats.truncated += 1
            ids, labels = ids[: tokenize.max_len], labels[: tokenize.max_len]
        if all(lbl == IGNORE_INDEX for lbl in labels):
            stats.dropped_no_target += 1
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def build_datasets(data_path: str, tokenizer, max_seq_length: int, eval_fraction: float, seed: int,
                   completion_only_loss: bool = True):
    """Everything the recipe needs: (train Dataset, eval Dataset or None, DataStats)."""
    from datasets import Dataset

    stats = DataStats(max_seq_length=max_seq_length)
    examples = load_examples(data_path, stats)
    train, held_out = split_examples(examples, eval_fraction, seed)
    tok = Tokenize(tokenizer, max_seq_length, completion_only_loss)
    train_cols = tokenize_examples(train, tok, stats)
    eval_cols = tokenize_examples(held_out, tok, stats)
    stats.n_train, stats.n_eval = len(train_cols["input_ids"]), len(eval_cols["input_ids"])
    if stats.n_train == 0:
        raise DataError(f"{data_path}: no training example has an answer within max_seq_length={max_seq_length} "
                        "tokens; raise max_seq_length (--set max_seq_length=N)")
    eval_ds = Dataset.from_dict(eval_cols) if stats.n_eval else None
    return Dataset.from_dict(train_cols), eval_ds, stats


PACKED_KEYS = ("input_ids", "labels", "position_ids")  # what every trl's padding-free collator hands the model


def without_boundaries(batch: dict) -> dict:
    """A collated packed batch as trl < 1.16 left it: PACKED_KEYS only, the model deriving the samples' boundaries
    from position_ids in every layer (the self-check's and the benchmark's comparison case)."""
    return {k: batch[k] for k in PACKED_KEYS}


def collate_packed(rows: list[dict], pad_token_id: int = 0) -> dict:
    """A packed micro-batch exactly as the recipe's trainer collates it (SFTTrainer with packing: TRL's
    DataCollatorForLanguageModeling, padding-free). `rows`: packed rows, each {"input_ids", "labels", "seq_lengths"}.
    They are laid end to end in one row; position_ids restart at each sample; a sample's first token carries no loss.
    From trl 1.16 the batch also holds the samples' boundaries for the varlen attention kernels (cu_seq_lens_q/k,
    max_length_q/k as ints, seq_idx), computed on the host; before, the model derived them from position_ids in every
    layer. The attention self-check (training/backends.py) and the benchmark (scripts/benchmark.py) use it so that
    they run what training runs."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)(rows)


# ------------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data", description="Check training data.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="report formats, counts, token lengths and truncation")
    v.add_argument("data", help="file or folder")
    v.add_argument("--preset", default="tiny", help="count as this preset trains: its tokenizer and max_seq_length")
    v.add_argument("--model", help="tokenizer to count tokens with (default: the preset's model)")
    v.add_argument("--max-seq-length", type=int, help="truncation length (default: the preset's)")
    v.add_argument("--eval-fraction", type=float, help="held-out share (default: the preset's)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from training.qlora_config import ConfigError, resolve_config
    from training.tiny import resolve_builtin

    try:  # the preset as the recipe resolves it, with these flags over it (and the same checks)
        cfg = resolve_config(args.preset, overrides={"model_name_or_path": args.model, "data": args.data,
                                                     "max_seq_length": args.max_seq_length,
                                                     "eval_fraction": args.eval_fraction})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, max_len = cfg.model_name_or_path, cfg.max_seq_length
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_builtin(model))
    except OSError as exc:
        print(f"error: cannot load the tokenizer of '{model}': {exc}", file=sys.stderr)
        return 2
    try:
        _, _, stats = build_datasets(cfg.data, tokenizer, max_len, cfg.eval_fraction, seed=cfg.seed)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = stats.summary()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Data: {args.data}")
    for f, fmt in report["files"].items():
        print(f"  {f}: {fmt}")
    print("Records per format: " + ", ".join(f"{k}={v}" for k, v in report["records_per_format"].items()))
    print(f"Examples: train={report['train_examples']} eval={report['eval_examples']}")
    t = report["tokens"]
    print(f"Tokens per example ({model}): min={t['min']} median={t['median']} p95={t['p95']} max={t['max']} "
          f"total={t['total']}")
    if model.startswith("builtin:tiny"):
        print(f"  (counted with the built-in tiny model's {len(tokenizer)}-token vocabulary: far more tokens than a "
              "real model's; for your model's counts pass --preset gemma-2b or --model ID_OR_PATH, "
              "make: PRESET=gemma-2b or MODEL=...)")
    print(f"Truncated at {max_len} tokens: {report['truncated']} "
          f"({100 * report['truncation_rate']:.1f}%)")
    if report["dropped_no_target"]:
        print(f"Skipped (no answer tokens left after truncation): {report['dropped_no_target']}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
