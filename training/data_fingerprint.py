"""What data a checkpoint was trained on, so that a resume notices when the data under it changed.

Each checkpoint holds `data_fingerprint.json` (written before its COMPLETE marker, so it is in the manifest):
the raw files (path relative to --data, size, SHA-256) and the split (eval_fraction, seed, example counts and a
SHA-256 of the tokenized train and eval examples in order). The checkpoint's data position (how many batches of
this epoch were consumed) means something only for the same examples in the same order: `--resume auto` with
different data is refused naming what changed, unless `--set resume_with_new_data=true`, which continues with the
data position reset (the new data is read from the start of the epoch) and records a `data_changed` event. The same
files tokenized differently (another max_seq_length) only warn: the position still points at the same examples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from training.checkpoints import CheckpointError, sha256_file
from training.runfiles import DATA_FINGERPRINT


def _data_files(data_path: Path) -> list[Path]:
    from training.data import find_data_files, is_saved_dataset

    if is_saved_dataset(data_path):
        return sorted(p for p in data_path.rglob("*") if p.is_file())
    return find_data_files(data_path)


def _examples_sha256(ds) -> str | None:
    """SHA-256 of the tokenized examples in order (input_ids and labels), from the Arrow buffers."""
    if ds is None:
        return None
    h = hashlib.sha256()
    table = ds.data
    for name in ("input_ids", "labels"):
        for chunk in table.column(name).chunks:
            offsets = chunk.offsets.to_numpy()
            h.update((offsets - offsets[0]).tobytes())
            h.update(chunk.flatten().to_numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(data_path: str, train_ds, eval_ds, eval_fraction: float, seed: int) -> dict[str, Any]:
    root = Path(data_path)
    files = {}
    for path in _data_files(root):
        size, digest = sha256_file(path)
        files[path.relative_to(root).as_posix() if root.is_dir() else path.name] = {"size": size, "sha256": digest}
    return {"data": str(data_path), "files": files,
            "split": {"eval_fraction": eval_fraction, "seed": seed, "train_examples": len(train_ds),
                      "eval_examples": len(eval_ds) if eval_ds is not None else 0,
                      "train_sha256": _examples_sha256(train_ds), "eval_sha256": _examples_sha256(eval_ds)}}


def read_fingerprint(ckpt: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(ckpt) / DATA_FINGERPRINT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per difference, naming the file or the split value."""
    changes = []
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for name in sorted(set(old_files) | set(new_files)):
        before, after = old_files.get(name), new_files.get(name)
        if before is None:
            changes.append(f"{name}: new file ({after['size']:,} bytes)")
        elif after is None:
            changes.append(f"{name}: removed")
        elif before != after:
            size = (f"size {before['size']:,} -> {after['size']:,} bytes" if before["size"] != after["size"]
                    else f"same size ({after['size']:,} bytes)")
            changes.append(f"{name}: content changed ({size})")
    old_split, new_split = old.get("split", {}), new.get("split", {})
    for key in ("eval_fraction", "seed", "train_examples", "eval_examples"):
        if old_split.get(key) != new_split.get(key):
            changes.append(f"split {key}: {old_split.get(key)} -> {new_split.get(key)}")
    if not changes:
        for key, what in (("train_sha256", "training"), ("eval_sha256", "evaluation")):
            if old_split.get(key) != new_split.get(key):
                changes.append(f"the tokenized {what} examples differ (tokenizer or max_seq_length changed?)")
    return changes


def check_resume_data(ckpt: Path, current: dict[str, Any], allow_new_data: bool, log) -> list[str]:
    """[] when the checkpoint's data is the current data; the changes when allow_new_data; else CheckpointError."""
    saved = read_fingerprint(ckpt)
    if saved is None:
        log(f"{ckpt} has no {DATA_FINGERPRINT} (saved by an older version): cannot check that the data is the same")
        return []
    changes = fingerprint_changes(saved, current)
    if not changes:
        return []
    if all(c.startswith("the tokenized") for c in changes):  # same files, same examples, same order
        log(f"resuming from {ckpt}: same data, tokenized differently ({'; '.join(changes)}); the data position "
            f"still points at the same examples")
        return []
    listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    if not allow_new_data:
        raise CheckpointError(
            f"cannot resume from {ckpt}: the training data changed since it was saved ({saved.get('data')} then, "
            f"{current.get('data')} now): {listed}. Its data position would skip or repeat examples. Restore the "
            f"data, start over (--resume never, or a new --run-name), or continue with the new data read from "
            f"the start of the epoch: --set resume_with_new_data=true")
    log(f"resuming from {ckpt} with changed data (resume_with_new_data=true): {listed}; the data position is "
        f"reset, the new data is read from the start of the epoch")
    return changes
