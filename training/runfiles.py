"""The run's files: every file and folder name a run writes or reads, in one place (docs/contracts.md).

A run named R writes two folders:
- `outputs/R/` (the run folder, `--output-dir`): `checkpoint-N/` (with `COMPLETE`, `run_config.json`,
  `data_fingerprint.json`), `adapter/`, `run_summary.json`, `eval.json`, `report/`, and the export's `merged/` and
  `gguf/`;
- `logs/R/` (`--logs-dir`/R): `metrics.jsonl` (steps and events), `train.log`, W&B's offline `wandb/`.
The sidecars write beside them: `logs/gpu_metrics.jsonl` (GPU monitor), and in the backup folder
`backups/R/checkpoint-N/`, `backups/R/LAST_BACKUP.json` and `backups/backup_events.jsonl`.

Modules take these names from here and never spell them out again. This module also owns writing and reading
the run's JSONL files: the event writer (`log_event`), the tolerant readers (`iter_records`, `read_records`,
`tail_records`), the one parser of the metrics JSONL (`read_history`), the run's state from its events
(`run_status`), the run list (`list_runs`) and the GPU log's rotated files (`rotated_files`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from training.jsonio import append_jsonl

# -- the run folder (outputs/<run>) -------------------------------------------------------------------------------
ADAPTER_DIR = "adapter"
ADAPTER_TMP_DIR = ".tmp-adapter"  # the final adapter is written here, then renamed to adapter/
ADAPTER_CONFIG = "adapter_config.json"  # peft's; its presence means a saved adapter
RUN_SUMMARY = "run_summary.json"
EVAL = "eval.json"
DATA_FINGERPRINT = "data_fingerprint.json"  # inside checkpoint-N/: the data it was trained on
REPORT_DIR = "report"
REPORT_MD = "report.md"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "COMPLETE"  # inside checkpoint-N/, written last: the checkpoint is complete
CHECKPOINT_RUN_CONFIG = "run_config.json"  # inside checkpoint-N/: the config it was trained with
TRAINER_STATE = "trainer_state.json"  # inside checkpoint-N/: HF's TrainerState
MERGED_DIR = "merged"  # the export's merged bf16/fp16 model
TRASH_PREFIX = ".trash-"  # a folder being deleted (renamed first); leftovers are garbage
SUPERSEDED_PREFIX = "superseded-"  # superseded-<time>/: complete checkpoints of another timeline, set aside
GPU_PLOT = "gpu.png"  # report/: the GPU plot; the others are report/<series>.png (loss, learning_rate, tokens_per_s)

# -- the logs folder (logs/<run>) ---------------------------------------------------------------------------------
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
WANDB_DIR = "wandb"  # W&B's offline runs (WANDB_DIR is logs/<run>; wandb adds this folder)

# -- the sidecars ---------------------------------------------------------------------------------------------------
GPU_METRICS = "gpu_metrics.jsonl"  # logs/gpu_metrics.jsonl, and rotated .1 .. .N beside it
LAST_BACKUP = "LAST_BACKUP.json"  # backups/<run>/, after each verified copy
BACKUP_EVENTS = "backup_events.jsonl"  # backups/: copied / pruned / failed records
BACKUP_LOCK = ".backup.lock"
BACKUP_TMP_PREFIX = ".tmp-"  # backups/<run>/.tmp-checkpoint-N-<pid>/: a copy being made and verified
TAIL_BYTES = 256 * 1024  # the GPU log can be tens of MB; the latest samples are in its last lines


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files are. `run_dir` is outputs/<run> (or --output-dir); `logs_dir` is logs/<run>."""

    name: str
    run_dir: Path
    logs_dir: Path

    @classmethod
    def of(cls, name: str, output_dir: str | Path | None = None, logs_root: str | Path = "logs",
           outputs_root: str | Path = "outputs") -> "RunPaths":
        run_dir = Path(output_dir) if output_dir else Path(outputs_root) / name
        return cls(name=name, run_dir=run_dir, logs_dir=Path(logs_root) / name)

    # outputs/<run>
    @property
    def adapter(self) -> Path:
        return self.run_dir / ADAPTER_DIR

    @property
    def adapter_tmp(self) -> Path:
        return self.run_dir / ADAPTER_TMP_DIR

    @property
    def summary(self) -> Path:
        return self.run_dir / RUN_SUMMARY

    @property
    def eval(self) -> Path:
        return self.run_dir / EVAL

    @property
    def fingerprint(self) -> Path:
        return self.run_dir / DATA_FINGERPRINT

    @property
    def report_dir(self) -> Path:
        return self.run_dir / REPORT_DIR

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / f"{CHECKPOINT_PREFIX}{step}"

    # logs/<run>
    @property
    def metrics(self) -> Path:
        return self.logs_dir / METRICS

    @property
    def train_log(self) -> Path:
        return self.logs_dir / TRAIN_LOG

    def has_adapter(self) -> bool:
        return (self.adapter / ADAPTER_CONFIG).is_file()

# -- the export's files (training/export/) --------------------------------------------------------------------------
EXPORT_REPORT = "export_report.json"  # in merged/ (--format merged) and in the GGUF folder: every number of the export
EXPORT_FAILED_REPORT = "export_report-{quant}-failed.json"  # the run folder: a failed GGUF check's evidence
MERGE_INFO = "merge_info.json"  # inside merged/, written last: the merge is complete (and what it was made of)

# -- numbers in records: garbled fields (strings, NaN, missing) never reach arithmetic -----------------------------
def num(value: Any) -> float | None:
    """A finite number or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def as_int(value: Any) -> int | None:
    v = num(value)
    return None if v is None else int(v)


# -- the tolerant readers (a writer may be mid-line; training/data.py's read_jsonl is the strict one for datasets) --
def parse_records(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON objects among raw lines, skipping blank, cut-off or garbled ones (a writer may be mid-write)."""
    for raw in lines:
        raw = raw.strip()
        if not raw:
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            yield rec


def iter_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file (none when it does not exist), tolerating a cut-off last line."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        yield from parse_records(fh)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    return list(iter_records(path))


def tail_records(path: str | os.PathLike, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """Records in the last max_bytes of a JSONL file (the first, partial line of the window is dropped)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            start = max(0, size - max_bytes)
            fh.seek(start)
            data = fh.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    return list(parse_records(lines[1:] if start > 0 else lines))


def rotated_files(path: str | os.PathLike) -> list[Path]:
    """The live file and its rotated copies, oldest first (`<path>.N` ... `<path>.1`, `<path>`), existing only."""
    path = Path(path)
    olds = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            olds.append((int(suffix), p))
    files = [p for _, p in sorted(olds, reverse=True)]
    if path.exists():
        files.append(path)
    return files


# -- the metrics JSONL --------------------------------------------------------------------------------------------
LIVE_EVENTS = ("start", "resumed")  # a process trains from here on: they name it (host, pid) for status


def log_event(metrics_path: Path, run: str, step: int, event: str, **fields: Any) -> None:
    """Append an event record (start, checkpoint, resumed, stopped, finished, failed); only rank 0 of a
    several-process run writes (the others would repeat every event)."""
    from training.distributed import is_main

    if not is_main():
        return
    if event in LIVE_EVENTS:
        fields = {"host": socket.gethostname(), "pid": os.getpid(), **fields}
    append_jsonl(metrics_path, {"ts": time.time(), "run": run, "step": step, "event": event, **fields})


@dataclass
class History:
    """One run's metrics JSONL, read once: training records (file order), eval losses, events, time span."""

    train: list[dict[str, Any]] = field(default_factory=list)  # records with a numeric step and no eval_loss
    evals: list[tuple[int | None, float]] = field(default_factory=list)  # (step or None, eval_loss), file order
    events: list[dict[str, Any]] = field(default_factory=list)
    start_ts: float | None = None  # the earliest and latest ts of any record
    end_ts: float | None = None

    def by_step(self) -> dict[int, dict[str, Any]]:
        """Training records by step, in step order; a resumed run's newest record wins for a step."""
        out = {int(num(r["step"])): r for r in self.train}
        return dict(sorted(out.items()))

    def evals_by_step(self) -> list[tuple[int, float]]:
        """(step, eval_loss) in step order, newest value per step; records without a step left out."""
        return sorted({s: v for s, v in self.evals if s is not None}.items())


def read_history(metrics_path: str | os.PathLike) -> History:
    """The one parser of `logs/<run>/metrics.jsonl` (status screen and report)."""
    h = History()
    for rec in iter_records(metrics_path):
        ts = num(rec.get("ts"))
        if ts is not None:
            h.start_ts = ts if h.start_ts is None else min(h.start_ts, ts)
            h.end_ts = ts if h.end_ts is None else max(h.end_ts, ts)
        if "event" in rec:
            h.events.append(rec)
        elif num(rec.get("eval_loss")) is not None:
            h.evals.append((as_int(rec.get("step")), num(rec["eval_loss"])))
        elif num(rec.get("step")) is not None:
            h.train.append(rec)
    return h


TERMINAL_EVENTS = ("finished", "failed", "stopped")


@dataclass(frozen=True)
class RunState:
    status: str  # unknown | running | finished | failed | stopped
    error: str | None = None  # of the last `failed` event
    signal: str | None = None  # of the last `stopped` event
    started_ts: float | None = None  # the `start` event's time (else the first `resumed`)
    host: str | None = None  # where the process that trains now runs, and its pid (the last start/resumed event)
    pid: int | None = None

    @property
    def detail(self) -> str | None:
        """What the status line adds in brackets: the error of a failed run, the signal of a stopped one."""
        return self.error if self.status == "failed" else self.signal if self.status == "stopped" else None


def run_status(events: list[dict[str, Any]], trained: bool = False) -> RunState:
    """The run's state from its events, the last start/resumed or terminal event winning. `trained`: there are
    training records; with no start event (an older writer) the run then counts as running."""
    status, error, signal, started_ts, host, pid = "unknown", None, None, None, None, None
    for ev in events:
        name = ev.get("event")
        if name in LIVE_EVENTS:
            status = "running"
            host, pid = ev.get("host"), as_int(ev.get("pid"))
            if name == "start" or started_ts is None:
                started_ts = num(ev.get("ts"))
        elif name in TERMINAL_EVENTS:
            status = name
            error = ev.get("error") if name == "failed" else error
            signal = ev.get("signal") if name == "stopped" else signal
    if status == "unknown" and trained:
        status = "running"
    return RunState(status, error, signal, started_ts, host if isinstance(host, str) else None, pid)


def list_runs(logs_dir: str | os.PathLike) -> list[str]:
    """Run names (folders of logs_dir holding a metrics.jsonl), oldest first by the metrics file's mtime."""
    runs = []
    try:
        entries = list(Path(logs_dir).iterdir())
    except OSError:
        return []
    for d in entries:
        m = d / METRICS
        try:
            if d.is_dir() and m.is_file():
                runs.append((m.stat().st_mtime, d.name))
        except OSError:
            continue
    return [name for _, name in sorted(runs)]
