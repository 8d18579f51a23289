"""Where a run starts, decided once before anything large loads: from scratch, from a checkpoint, only the final
save of a checkpoint that already reached max_steps, or nothing at all because the run is already finished.

`--resume auto|never|PATH` names the checkpoint (training/checkpoints.py::resolve_resume: a bad PATH is an error,
never a silent fresh start); the checkpoint's COMPLETE manifest gives the step, whatever its folder is called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from training.checkpoints import check_resume_compatible, read_manifest, resolve_resume
from training.runfiles import ADAPTER_CONFIG, ADAPTER_DIR, RUN_SUMMARY


@dataclass(frozen=True)
class Fresh:
    """No checkpoint: train from step 0."""

    checkpoint: None = None
    step: int = 0
    changes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Train:
    """Train on from this checkpoint (its optimizer, scheduler and data position)."""

    checkpoint: Path
    step: int
    changes: list[str] = field(default_factory=list)  # config keys that differ from the checkpoint's run


@dataclass(frozen=True)
class SaveOnly:
    """The checkpoint already reached max_steps but the final save never happened: save its adapter, train nothing."""

    checkpoint: Path
    step: int
    changes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AlreadyDone:
    """The run ended normally at this step (its summary and adapter are there): nothing to do."""

    checkpoint: Path
    step: int
    changes: list[str] = field(default_factory=list)


Start = Union[Fresh, Train, SaveOnly, AlreadyDone]


def decide_start(resume: str, run_dir: Path, run_config: dict, max_steps: int, fsdp: bool,
                 log: Callable[[str], None]) -> Start:
    """`resume` is the CLI's auto|never|PATH. Under FSDP a checkpoint holds shards, not the adapter: a finished
    checkpoint is trained on (HF's resume runs one step past max_steps) instead of saved as it is."""
    checkpoint = resolve_resume(resume, run_dir, log=log)
    if checkpoint is None:
        return Fresh()
    changes = check_resume_compatible(checkpoint, run_config, log=log)
    step = (read_manifest(checkpoint) or {}).get("step") or 0
    if step >= max_steps and finished_at(run_dir, step):
        return AlreadyDone(checkpoint, step, changes)
    if step >= max_steps and not fsdp:
        return SaveOnly(checkpoint, step, changes)
    return Train(checkpoint, step, changes)


def finished_at(run_dir: Path, step: int) -> bool:
    """Whether the run already ended normally at `step`: its summary says so and its adapter is there."""
    try:
        summary = json.loads((run_dir / RUN_SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (summary.get("status") == "finished" and summary.get("steps") == step
            and (run_dir / ADAPTER_DIR / ADAPTER_CONFIG).is_file())
