"""Never lose work, the file layer: complete-checkpoint markers, the newest complete checkpoint, the resume choice.

A checkpoint folder `outputs/<run>/checkpoint-N/` counts only once its `COMPLETE` marker exists. The marker is
written last, atomically (temp file + fsync + rename), after every other file of the folder has been fsynced, and
holds a manifest of their sizes and SHA-256 (format in docs/contracts.md). Resume and backup use nothing else.

How thorough the check is: resume re-hashes every file of the checkpoint it picks (`level="full"`). A QLoRA
checkpoint is the adapter plus its optimizer state (tens to a few hundred MB), so that costs well under a second to a
few seconds once per start, and it is the only check that catches a flipped or zeroed byte. Only the newest
candidates are hashed: the search stops at the first one that passes. `level="sizes"` (stat only) is for listings
that run often, such as the status screen.

The trainer side (marker after each save, retention, events, stop signal = save) is
training/checkpoint_callback.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from training.errors import UserError
from training.qlora_config import OPTIM_STATE
from training.runfiles import (ADAPTER_CONFIG, CHECKPOINT_MARKER, CHECKPOINT_PREFIX, CHECKPOINT_RUN_CONFIG,
                               SUPERSEDED_PREFIX, TRAINER_STATE, TRASH_PREFIX)

logger = logging.getLogger(__name__)

MARKER_NAME = CHECKPOINT_MARKER
RUN_CONFIG_NAME = CHECKPOINT_RUN_CONFIG
CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
# What must not change between a checkpoint and the run resuming from it: the adapter would not load (rank,
# target modules) or would silently apply to other weights (base model).
INCOMPATIBLE_KEYS = ("model_name_or_path", "lora_r", "target_modules")  # names of training/qlora_config.py
_CHUNK = 1 << 20

Log = Callable[[str], None]


class CheckpointError(UserError):
    """A checkpoint problem the user must act on; the message says what, where and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Files: hashing, fsync, the manifest and the marker
# ---------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, *, fsync: bool = False, copy_to: IO[bytes] | None = None,
                each_chunk: Callable[[], None] | None = None) -> tuple[int, str]:
    """(size, sha256 hex) of a file; with fsync=True the file is also flushed to disk first. `copy_to`: also write
    every chunk there (a verified copy reads the source once); `each_chunk` is called before each chunk is used
    (e.g. to raise on a stop request)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        if fsync:
            os.fsync(fh.fileno())
        while chunk := fh.read(_CHUNK):
            if each_chunk is not None:
                each_chunk()
            h.update(chunk)
            size += len(chunk)
            if copy_to is not None:
                copy_to.write(chunk)
    return size, h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_internal_name(name: str) -> bool:
    """Our own temp/marker files, never part of a manifest."""
    return name == MARKER_NAME or name.startswith(f".{MARKER_NAME}.") or name.startswith(".tmp")


def list_checkpoint_files(ckpt: str | os.PathLike) -> list[str]:
    """Relative paths (with '/') of every regular file in a checkpoint folder except the marker, sorted."""
    root = Path(ckpt)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if _is_internal_name(name):
                continue
            full = Path(dirpath) / name
            if full.is_file() and not full.is_symlink():
                out.append(full.relative_to(root).as_posix())
    return sorted(out)


def build_manifest(ckpt: str | os.PathLike, step: int, *, fsync: bool = True) -> dict[str, Any]:
    """Hash every file of the folder (fsyncing each one when asked) into the manifest of docs/contracts.md."""
    root = Path(ckpt)
    files = {}
    for rel in list_checkpoint_files(root):
        size, digest = sha256_file(root / rel, fsync=fsync)
        files[rel] = {"size": size, "sha256": digest}
    if fsync:
        for d in sorted({(root / rel).parent for rel in files} | {root}):
            fsync_dir(d)
    return {"step": int(step), "created": time.time(), "files": files}


def write_manifest_marker(ckpt: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write COMPLETE atomically: temp file, fsync, rename, fsync the folder. Returns the marker path."""
    root = Path(ckpt)
    marker = root / MARKER_NAME
    tmp = root / f".{MARKER_NAME}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, marker)
    fsync_dir(root)
    return marker


def write_complete_marker(ckpt: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Mark a fully written checkpoint folder complete. `step` defaults to the N of `checkpoint-N`."""
    root = Path(ckpt)
    if step is None:
        step = checkpoint_step(root)
        if step is None:
            raise ValueError(f"{root}: not named checkpoint-N; pass step=")
    manifest = build_manifest(root, step, fsync=True)
    write_manifest_marker(root, manifest)
    return manifest


def read_manifest(ckpt: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a checkpoint, or None when there is no readable marker."""
    try:
        with open(Path(ckpt) / MARKER_NAME, "r", encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify_checkpoint(ckpt: str | os.PathLike, level: str = "full") -> list[str]:
    """Every problem of a checkpoint folder, one line each naming the file; [] means complete and intact.

    level="full" re-hashes each file; level="sizes" only compares sizes (cheap, misses flipped bytes).
    """
    if level not in ("full", "sizes"):
        raise ValueError(f"level must be 'full' or 'sizes', not {level!r}")
    root = Path(ckpt)
    if not root.is_dir():
        return [f"{root}: not a folder"]
    if not (root / MARKER_NAME).exists():
        return [f"{root}: no {MARKER_NAME} marker (the save did not finish)"]
    manifest = read_manifest(root)
    if manifest is None:
        return [f"{root / MARKER_NAME}: marker unreadable (not a manifest)"]
    problems = []
    if not manifest["files"]:
        problems.append(f"{root / MARKER_NAME}: manifest lists no files")
    for rel, want in sorted(manifest["files"].items()):
        path = root / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != want.get("size"):
            problems.append(f"{path}: size {size} bytes, manifest says {want.get('size')} (truncated or replaced)")
            continue
        if level == "full":
            _, digest = sha256_file(path)
            if digest != want.get("sha256"):
                problems.append(f"{path}: SHA-256 differs from the manifest (corrupted)")
    return problems


def is_complete_checkpoint(path: str | os.PathLike, level: str = "full") -> tuple[bool, str]:
    """(True, "complete") or (False, why) for one checkpoint folder."""
    problems = verify_checkpoint(path, level=level)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return False, problems[0] + more
    return True, "complete"


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints and choosing where to resume
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-N` folder of a run, complete or not, oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


@dataclass(frozen=True)
class Checkpoint:
    """One `checkpoint-N` folder and why it is not complete (`problem`; None when it is)."""

    step: int
    path: Path
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.problem is None


def iter_complete_checkpoints(run_dir: str | os.PathLike, level: str = "full",
                              newest_first: bool = True) -> Iterator[Checkpoint]:
    """Every `checkpoint-N` folder of a run, newest first (or oldest first), each checked when it is reached (so a
    search that stops at the first complete one hashes nothing older).

    level: "full" (re-hash), "sizes" (stat only) as verify_checkpoint, or "marker" (only that COMPLETE exists: what
    the disk and OOM clean-ups go by). A folder that vanishes while it is checked comes back incomplete.
    """
    found = list_checkpoints(run_dir)
    for step, path in reversed(found) if newest_first else found:
        if level == "marker":
            problem = None if (path / MARKER_NAME).exists() else f"{path}: no {MARKER_NAME} marker"
        else:
            try:
                ok, reason = is_complete_checkpoint(path, level=level)
            except OSError as exc:  # deleted or rotated between listing and reading
                ok, reason = False, str(exc)
            problem = None if ok else reason
        yield Checkpoint(step, path, problem)


def find_latest_complete_checkpoint(
    run_dir: str | os.PathLike, log: Log | None = None, level: str = "full"
) -> Path | None:
    """The newest checkpoint of a run that passes verification; logs each newer folder skipped and why."""
    log = logger.warning if log is None else log
    for ckpt in iter_complete_checkpoints(run_dir, level=level):
        if ckpt.complete:
            return ckpt.path
        log(f"skipping {ckpt.path.name}: {ckpt.problem}")
    return None


def resolve_resume(resume: str, run_dir: str | os.PathLike, log: Log | None = None) -> Path | None:
    """Turn `--resume auto|never|PATH` into a checkpoint folder, or None for a fresh start.

    auto: the newest complete checkpoint of run_dir, or None (and says so). never: None. PATH: that folder, which
    must be a complete checkpoint; anything else raises CheckpointError (never a silent fresh start).
    """
    log = logger.warning if log is None else log
    run_dir = Path(run_dir)
    if resume == "never":
        log(f"--resume never: starting fresh in {run_dir}")
        return None
    if resume == "auto":
        latest = find_latest_complete_checkpoint(run_dir, log=log)
        if latest is None:
            log(f"--resume auto: no complete checkpoint in {run_dir}: starting fresh")
        else:
            log(f"--resume auto: resuming from {latest}")
        return latest
    path = Path(resume)
    fix = (f"Give a complete checkpoint folder, or use --resume auto (newest complete checkpoint of the run) or "
           f"--resume never (start over).")
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: {path} does not exist. {fix}")
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: {path} is not a folder. {fix}")
    if checkpoint_step(path) is None and list_checkpoints(path):
        raise CheckpointError(f"--resume {resume}: {path} is a run folder, not a checkpoint; name one of its "
                              f"checkpoint-N folders, or use --resume auto with this run.")
    ok, reason = is_complete_checkpoint(path)
    if not ok:
        others = [str(c.path) for c in iter_complete_checkpoints(path.parent, level="sizes")
                  if c.complete and c.path != path]
        hint = f" Complete checkpoints next to it: {', '.join(others[:3])}." if others else ""
        raise CheckpointError(f"--resume {resume}: {path} is not a complete checkpoint: {reason}.{hint} {fix}")
    log(f"--resume: resuming from {path}")
    return path


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple, set)):
        return sorted(str(v) for v in value)
    return value


def read_run_config(ckpt: str | os.PathLike) -> dict[str, Any] | None:
    """What a checkpoint records about the run that made it: run_config.json, else PEFT's adapter_config.json."""
    root = Path(ckpt)
    try:
        return json.loads((root / RUN_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    for cfg_path in [root / ADAPTER_CONFIG, *sorted(root.glob(f"*/{ADAPTER_CONFIG}"))]:
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        # Its base_model_name_or_path is the resolved local path (differs between native and container runs), so
        # only rank and target modules are compared here.
        return {"lora_r": cfg.get("r"), "target_modules": cfg.get("target_modules")}
    return None


def check_resume_compatible(ckpt: str | os.PathLike, run_config: dict[str, Any], log: Log | None = None) -> list[str]:
    """Refuse (CheckpointError) when base model, LoRA rank or target modules differ, or the optimizer keeps its state
    in another form; return (and log) the other differences, which are allowed (e.g. more max_steps)."""
    log = logger.warning if log is None else log
    saved = read_run_config(ckpt)
    if saved is None:
        log(f"{ckpt}: no {RUN_CONFIG_NAME} or {ADAPTER_CONFIG}; cannot check that it matches this run")
        return []
    bad, changes = [], []
    for key in sorted(set(saved) | set(run_config)):
        old, new = saved.get(key), run_config.get(key)
        if key not in saved or key not in run_config or _normalise(old) == _normalise(new):
            continue
        if key in INCOMPATIBLE_KEYS:
            bad.append(f"{key}: checkpoint {old!r}, now {new!r}")
        elif key == "optim" and OPTIM_STATE.get(old) != OPTIM_STATE.get(new):
            bad.append(f"optim: checkpoint {old!r}, now {new!r} (its saved state is "
                       f"{OPTIM_STATE.get(old, 'unknown')}'s, which {new!r} cannot read)")
        else:
            changes.append(f"{key}: {old!r} -> {new!r}")
    if bad:
        raise CheckpointError(
            f"cannot resume from {ckpt}: it was trained with a different " + "; ".join(bad) + ". Use the same "
            f"settings, or start a new run (--run-name NEW, or --resume never to overwrite this run's progress).")
    for change in changes:
        log(f"resuming from {ckpt} with a changed setting (allowed): {change}")
    return changes


# ---------------------------------------------------------------------------------------------------------------
# Removing folders so that no reader ever sees half of one
# ---------------------------------------------------------------------------------------------------------------


def remove_tree_atomically(path: str | os.PathLike) -> None:
    """Rename the folder out of the way first (one atomic step), then delete it: a crash in between leaves a
    `.trash-*` folder that nothing reads, never a checkpoint with missing files."""
    path = Path(path)
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Delete `.trash-*` folders left by a crash during a deletion."""
    root = Path(folder)
    if root.is_dir():
        for child in root.glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(child, ignore_errors=True)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, log: Log | None = None) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (by size check: they were hashed when marked); delete older
    complete ones and incomplete ones older than the newest complete one. Returns what was deleted."""
    log = logger.info if log is None else log
    if keep is None or keep <= 0:
        return []
    ckpts = list(iter_complete_checkpoints(run_dir, level="sizes", newest_first=False))
    complete = [c for c in ckpts if c.complete]
    if not complete:
        return []
    kept = {c.path for c in complete[-keep:]}
    removed = []
    for c in ckpts:
        if c.path in kept or c.step >= complete[-1].step:
            continue
        remove_tree_atomically(c.path)
        removed.append(c.path)
        log(f"removed old checkpoint {c.path} (keeping the newest {keep} complete)")
    return removed


def set_aside_later_checkpoints(run_dir: str | os.PathLike, step: int, log: Log | None = None) -> list[Path]:
    """Before training from `step`: folders of later steps belong to another timeline and would be overwritten
    file by file. Complete ones move to `superseded-<time>/` (never deleted), incomplete ones are deleted."""
    log = logger.warning if log is None else log
    run_dir = Path(run_dir)
    remove_leftovers(run_dir)
    moved = []
    aside = run_dir / f"{SUPERSEDED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    for s, path in list_checkpoints(run_dir):
        if s <= step:
            continue
        if (path / MARKER_NAME).exists():
            aside.mkdir(exist_ok=True)
            os.rename(path, aside / path.name)
            moved.append(aside / path.name)
            log(f"moved {path} to {aside}/ : it is later than step {step}, where this run starts, and would be "
                f"overwritten (delete that folder when you no longer need it)")
        else:
            remove_tree_atomically(path)
            log(f"deleted incomplete {path} (no {MARKER_NAME} marker: an interrupted save)")
    if moved:
        fsync_dir(run_dir)
    return moved



# ---------------------------------------------------------------------------------------------------------------
# Loading a checkpoint into a trainer without training (the callback is training/checkpoint_callback.py)
# ---------------------------------------------------------------------------------------------------------------


def load_finished_checkpoint(trainer: Any, ckpt: str | os.PathLike) -> None:
    """Put a checkpoint that already reached max_steps into `trainer` (adapter weights and TrainerState) without
    training: the run was stopped between its last save and the final adapter. HF's resume would train one step
    past max_steps here (its loop checks the limit only after a step)."""
    from transformers import TrainerState

    ckpt = Path(ckpt)
    model = trainer.model
    model.load_adapter(str(ckpt), model.active_adapter, is_trainable=True, autocast_adapter_dtype=False)
    trainer.state = TrainerState.load_from_json(str(ckpt / TRAINER_STATE))
