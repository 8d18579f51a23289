"""JSON writes that are never seen half-done: a JSON Lines record appended a whole line at a time (the files between
services), a JSON document replaced atomically. Reading them tolerantly is training/runfiles.py's (iter_records,
read_records, tail_records)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as a single line; one write() on an O_APPEND fd, so readers never see half a line
    from us unless the process dies inside that call (readers tolerate that, see runfiles.iter_records)."""
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
