"""The run's files: every file and folder name a run writes or reads, in one place (docs/contracts.md).

A run named R writes two folders:
- `outputs/R/` (the run folder, `--output-dir`): `checkpoint-N/`, `adapter/`, `run_summary.json`, `eval.json`,
  `data_fingerprint.json`, `report/`, and the export's `merged/` and `gguf/`;
- `logs/R/` (`--logs-dir`/R): `metrics.jsonl` (steps and events), `train.log`.
The sidecars write beside them: `logs/gpu_metrics.jsonl` (GPU monitor), and in the backup folder
`backups/R/checkpoint-N/`, `backups/R/LAST_BACKUP.json` and `backups/backup_events.jsonl`.

Modules take these names from here and never spell them out again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# -- the run folder (outputs/<run>) -------------------------------------------------------------------------------
ADAPTER_DIR = "adapter"
ADAPTER_TMP_DIR = ".tmp-adapter"  # the final adapter is written here, then renamed to adapter/
ADAPTER_CONFIG = "adapter_config.json"  # peft's; its presence means a saved adapter
RUN_SUMMARY = "run_summary.json"
EVAL = "eval.json"
DATA_FINGERPRINT = "data_fingerprint.json"
REPORT_DIR = "report"
REPORT_MD = "report.md"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "COMPLETE"  # inside checkpoint-N/, written last: the checkpoint is complete
CHECKPOINT_RUN_CONFIG = "run_config.json"  # inside checkpoint-N/: the config it was trained with
MERGED_DIR = "merged"  # the export's merged bf16/fp16 model

# -- the logs folder (logs/<run>) ---------------------------------------------------------------------------------
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"

# -- the sidecars ---------------------------------------------------------------------------------------------------
GPU_METRICS = "gpu_metrics.jsonl"  # logs/gpu_metrics.jsonl, and rotated .1 .. .N beside it
LAST_BACKUP = "LAST_BACKUP.json"  # backups/<run>/, after each verified copy
BACKUP_EVENTS = "backup_events.jsonl"  # backups/: copied / pruned / failed records
BACKUP_LOCK = ".backup.lock"


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
