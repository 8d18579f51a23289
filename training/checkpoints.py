"""Never lose work: complete-checkpoint markers, the newest complete checkpoint, the resume choice, stop = save.

A checkpoint folder `outputs/<run>/checkpoint-N/` counts only once its `COMPLETE` marker exists. The marker is
written last, atomically (temp file + fsync + rename), after every other file of the folder has been fsynced, and
holds a manifest of their sizes and SHA-256 (format in docs/contracts.md). Resume and backup use nothing else.

How thorough the check is: resume re-hashes every file of the checkpoint it picks (`level="full"`). A QLoRA
checkpoint is the adapter plus its optimizer state (tens to a few hundred MB), so that costs well under a second to a
few seconds once per start, and it is the only check that catches a flipped or zeroed byte. Only the newest
candidates are hashed: the search stops at the first one that passes. `level="sizes"` (stat only) is for listings
that run often, such as the status screen.

Several ranks (`accelerate launch`, GPUS=N): the ranks agree on the stop at the end of an optimizer step (one
all-reduce per step), save that step together, and rank 0 writes the marker after a barrier, so the manifest covers
every rank's files (rng_state_R.pth, FSDP shards). A signal that lands during evaluation or a save is acted on at the
next step end (one step later than alone). After forwarding SIGTERM, torchrun SIGKILLs the ranks after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default; the Makefile's launch sets 110).
DataLoader workers must be forked (Linux default up to Python 3.13) to inherit the handler that keeps them alive on
Ctrl+C.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from training import distributed
from training.jsonl import append_jsonl, write_json_atomic
from training.errors import UserError

logger = logging.getLogger(__name__)

MARKER_NAME = "COMPLETE"
RUN_CONFIG_NAME = "run_config.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What must not change between a checkpoint and the run resuming from it: the adapter would not load (rank,
# target modules) or would silently apply to other weights (base model).
INCOMPATIBLE_KEYS = ("model_name_or_path", "lora_r", "target_modules")  # names of training/qlora_config.py
# Test-only hook: "POINT@STEP:SECONDS" (POINT: step | eval | save | final) makes the callback pause once at that point so
# that tests can deliver a signal there. Never set it in real runs.
TEST_PAUSE_ENV = "QLORA_TEST_PAUSE"
_CHUNK = 1 << 20

Log = Callable[[str], None]


class CheckpointError(UserError):
    """A checkpoint problem the user must act on; the message says what, where and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Files: hashing, fsync, the manifest and the marker
# ---------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, *, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file; with fsync=True the file is also flushed to disk first."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        if fsync:
            os.fsync(fh.fileno())
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
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


def find_latest_complete_checkpoint(
    run_dir: str | os.PathLike, log: Log | None = None, level: str = "full"
) -> Path | None:
    """The newest checkpoint of a run that passes verification; logs each newer folder skipped and why."""
    log = logger.warning if log is None else log
    for step, path in reversed(list_checkpoints(run_dir)):
        ok, reason = is_complete_checkpoint(path, level=level)
        if ok:
            return path
        log(f"skipping {path.name}: {reason}")
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
        others = [str(p) for _, p in reversed(list_checkpoints(path.parent))
                  if p != path and is_complete_checkpoint(p, level="sizes")[0]]
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
    for cfg_path in [root / "adapter_config.json", *sorted(root.glob("*/adapter_config.json"))]:
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        # Its base_model_name_or_path is the resolved local path (differs between native and container runs), so
        # only rank and target modules are compared here.
        return {"lora_r": cfg.get("r"), "target_modules": cfg.get("target_modules")}
    return None


def check_resume_compatible(ckpt: str | os.PathLike, run_config: dict[str, Any], log: Log | None = None) -> list[str]:
    """Refuse (CheckpointError) when base model, LoRA rank or target modules differ; return (and log) the other
    differences, which are allowed (e.g. more max_steps)."""
    log = logger.warning if log is None else log
    saved = read_run_config(ckpt)
    if saved is None:
        log(f"{ckpt}: no {RUN_CONFIG_NAME} or adapter_config.json; cannot check that it matches this run")
        return []
    bad, changes = [], []
    for key in sorted(set(saved) | set(run_config)):
        old, new = saved.get(key), run_config.get(key)
        if key not in saved or key not in run_config or _normalise(old) == _normalise(new):
            continue
        if key in INCOMPATIBLE_KEYS:
            bad.append(f"{key}: checkpoint {old!r}, now {new!r}")
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
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Delete `.trash-*` folders left by a crash during a deletion."""
    root = Path(folder)
    if root.is_dir():
        for child in root.glob(".trash-*"):
            shutil.rmtree(child, ignore_errors=True)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, log: Log | None = None) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (by size check: they were hashed when marked); delete older
    complete ones and incomplete ones older than the newest complete one. Returns what was deleted."""
    log = logger.info if log is None else log
    if keep is None or keep <= 0:
        return []
    ckpts = list_checkpoints(run_dir)
    complete = [(s, p) for s, p in ckpts if is_complete_checkpoint(p, level="sizes")[0]]
    if not complete:
        return []
    kept = {p for _, p in complete[-keep:]}
    newest_complete = complete[-1][0]
    removed = []
    for step, path in ckpts:
        if path in kept or step >= newest_complete:
            continue
        remove_tree_atomically(path)
        removed.append(path)
        log(f"removed old checkpoint {path} (keeping the newest {keep} complete)")
    return removed


def set_aside_later_checkpoints(run_dir: str | os.PathLike, step: int, log: Log | None = None) -> list[Path]:
    """Before training from `step`: folders of later steps belong to another timeline and would be overwritten
    file by file. Complete ones move to `superseded-<time>/` (never deleted), incomplete ones are deleted."""
    log = logger.warning if log is None else log
    run_dir = Path(run_dir)
    remove_leftovers(run_dir)
    moved = []
    aside = run_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
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
# The trainer side: marker after each save, retention, events, stop signal = save
# ---------------------------------------------------------------------------------------------------------------


def keep_adapter_dtype_on_resume(model: Any) -> bool:
    """Make HF's resume load the adapter weights into the dtype the fresh trainer gave them.

    The Trainer resumes a PEFT model with `load_adapter()`, which by default upcasts bf16/fp16 adapter weights to
    fp32 (`autocast_adapter_dtype=True`), while TRL keeps QLoRA adapters in bf16: the resumed run would then train
    in another precision than an uninterrupted one (measured on the tiny preset: losses 2e-5 relative apart two
    steps after the resume point, adapter weights 5e-4 apart). Returns whether the model was adjusted.
    """
    import functools
    import inspect

    load = getattr(model, "load_adapter", None)
    if load is None:
        return False
    try:
        if "autocast_adapter_dtype" not in inspect.signature(load).parameters:
            return False
    except (TypeError, ValueError):
        return False
    model.load_adapter = functools.partial(load, autocast_adapter_dtype=False)
    return True


def load_finished_checkpoint(trainer: Any, ckpt: str | os.PathLike) -> None:
    """Put a checkpoint that already reached max_steps into `trainer` (adapter weights and TrainerState) without
    training: the run was stopped between its last save and the final adapter. HF's resume would train one step
    past max_steps here (its loop checks the limit only after a step)."""
    from transformers import TrainerState

    ckpt = Path(ckpt)
    model = trainer.model
    model.load_adapter(str(ckpt), model.active_adapter, is_trainable=True, autocast_adapter_dtype=False)
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _parse_test_pause(value: str | None) -> tuple[str, int, float] | None:
    """"save@2:30" -> ("save", 2, 30.0); malformed -> None."""
    if not value:
        return None
    m = re.fullmatch(r"(step|eval|save|final)@(\d+):([0-9.]+)", value.strip())
    if not m:
        print(f"[checkpoints] ignoring {TEST_PAUSE_ENV}={value!r} (want POINT@STEP:SECONDS)", file=sys.stderr)
        return None
    return m.group(1), int(m.group(2)), float(m.group(3))


class _CheckpointCallbackLogic:
    """The body of CheckpointCallback (which adds transformers' TrainerCallback as a base on first use, so that the
    backup sidecar and other file-level users of this module do not pay the 10+ s transformers import).

    Makes every HF checkpoint complete (marker + manifest + run_config.json + extra_json files), keeps the newest `keep`, records
    `checkpoint` / `resumed` / `stopped` events, and turns the first SIGTERM/SIGINT into "finish this optimizer
    step, save a full checkpoint, stop"; a second signal exits at once (the last complete checkpoint is untouched).

    Set `save_total_limit=None` in TrainingArguments: HF rotates before this callback marks the new checkpoint, so
    its rotation could delete the last complete one while the new one is not yet marked.
    After `trainer.train()` returns, `exit_status` is 128+signum when a signal stopped the run before max_steps
    (143 for SIGTERM, 130 for SIGINT), else None.
    """

    def __init__(
        self,
        *,
        run_name: str,
        metrics_path: str | os.PathLike | None = None,
        run_config: dict[str, Any] | None = None,
        keep: int | None = 3,
        resumed_from: str | os.PathLike | None = None,
        resume_changes: Iterable[str] = (),
        extra_json: dict[str, Any] | None = None,
        install_signal_handlers: bool = True,
        log: Log | None = None,
    ):
        self.run_name = run_name
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.run_config = dict(run_config) if run_config else None
        self.keep = keep
        self.resumed_from = Path(resumed_from) if resumed_from else None
        self.resume_changes = list(resume_changes)
        self.extra_json = dict(extra_json or {})  # more JSON files each checkpoint records (name -> content)
        self.log = logger.warning if log is None else log
        self.stop_signal: int | None = None  # the signal this process received
        # Several ranks (accelerate launch): the signal every rank agreed to act on at the end of an optimizer step
        # (another rank's, when this one has not received it yet).
        self._agreed_signal: int | None = None
        self.stopped_early = False
        self.last_complete: Path | None = None
        self._stop_announced = False
        self._test_pause = _parse_test_pause(os.environ.get(TEST_PAUSE_ENV))
        self._previous_handlers: dict[int, Any] = {}
        self._owner_pid = os.getpid()
        if install_signal_handlers:
            self.install_signal_handlers()

    # -- signals -----------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        self._owner_pid = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs in the main thread between bytecodes; os.write, not print/logging (not reentrant-safe).
        if os.getpid() != self._owner_pid:
            # A forked DataLoader worker (it inherits this handler): Ctrl+C reaches the whole process group, and
            # the worker must keep serving batches while the main process finishes the step and saves.
            return
        if self.stop_signal is not None:
            os.write(2, f"\n[checkpoints] second {_signal_name(signum)}: exiting now without saving; the last "
                        f"complete checkpoint is untouched\n".encode())
            os._exit(128 + signum)
        self.stop_signal = signum
        os.write(2, f"\n[checkpoints] {_signal_name(signum)} received: finishing this step, then saving a complete "
                    f"checkpoint and stopping (send it again to exit at once)\n".encode())

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    @property
    def _signum(self) -> int | None:
        return self.stop_signal or self._agreed_signal

    @property
    def exit_status(self) -> int | None:
        """128+signum when a signal stopped training before max_steps, else None (a signal during the last step
        lets the run finish normally)."""
        return 128 + self._signum if self.stopped_early else None

    def _should_stop(self) -> bool:
        """Alone: act on a signal at the next hook. Several ranks: only once all of them agreed on it at the end of
        an optimizer step (`_agree_on_stop`), so that every rank saves the same step together; a rank that saved or
        stopped alone would wait forever for the others in the next collective."""
        if distributed.initialised():
            return self._agreed_signal is not None
        return self.stop_requested

    def _agree_on_stop(self) -> None:
        """Every rank calls this at every optimizer step end: one tiny all-reduce (max of the signal numbers)."""
        if distributed.initialised() and self._agreed_signal is None:
            agreed = distributed.agree_max(self.stop_signal or 0)
            self._agreed_signal = agreed or None

    def _request_save_and_stop(self, state: Any, control: Any, where: str) -> None:
        control.should_save = True
        control.should_training_stop = True
        if not self._stop_announced:
            self._stop_announced = True
            self.log(f"{_signal_name(self._signum)}: saving a complete checkpoint at step {state.global_step} "
                     f"({where}) and stopping")

    # -- events ------------------------------------------------------------------------------------------------
    def _event(self, state: Any, event: str, **fields: Any) -> None:
        if self.metrics_path is None or not state.is_world_process_zero:
            return
        append_jsonl(self.metrics_path, {"ts": time.time(), "run": self.run_name, "step": state.global_step,
                                         "event": event, **fields})

    def _maybe_pause(self, point: str, step: int, run_dir: str) -> None:
        if self._test_pause is None:
            return
        want_point, want_step, seconds = self._test_pause
        if point != want_point or step != want_step:
            return
        self._test_pause = None
        flag = Path(run_dir) / f".test-paused-{point}-{step}"
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text(str(os.getpid()))
        print(f"[checkpoints] TEST PAUSE at {point} (step {step}) for {seconds}s ({TEST_PAUSE_ENV})",
              file=sys.stderr, flush=True)
        deadline = time.time() + seconds
        while time.time() < deadline and not self.stop_requested:  # a stop signal ends the pause
            time.sleep(0.05)

    # -- trainer hooks -----------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self.resumed_from is not None and model is not None:
            keep_adapter_dtype_on_resume(model)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if args.save_total_limit is not None:
            self.log(f"save_total_limit={args.save_total_limit}: HF may delete the last complete checkpoint before "
                     f"the new one is marked; set it to None (this callback keeps the newest {self.keep})")
        set_aside_later_checkpoints(args.output_dir, state.global_step, log=self.log)
        if self.resumed_from is not None:
            self._event(state, "resumed", path=str(self.resumed_from), changes=self.resume_changes)

    def on_step_begin(self, args, state, control, **kwargs):
        self._maybe_pause("step", state.global_step + 1, args.output_dir)

    def on_step_end(self, args, state, control, **kwargs):
        self._agree_on_stop()
        if self._should_stop():
            self._request_save_and_stop(state, control, "end of the current optimizer step")

    def on_log(self, args, state, control, **kwargs):
        if self._should_stop():
            self._request_save_and_stop(state, control, "after logging")

    def on_prediction_step(self, args, state, control, **kwargs):
        self._maybe_pause("eval", state.global_step, args.output_dir)

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation runs after on_step_end; the save decision comes right after this hook.
        if self._should_stop():
            self._request_save_and_stop(state, control, "after evaluation")

    def on_save(self, args, state, control, **kwargs):
        # Several ranks: each writes its own files (rng_state_R.pth; FSDP: its shards) and HF does not wait for
        # them, so the manifest is built only once every rank has finished its part of this save.
        distributed.barrier()
        if state.is_world_process_zero:
            started = time.time()
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not ckpt.is_dir():
                self.log(f"HF reported a save but {ckpt} does not exist; no marker written")
            else:
                if self.run_config is not None:
                    write_json_atomic(ckpt / RUN_CONFIG_NAME, self.run_config)
                for name, content in self.extra_json.items():
                    write_json_atomic(ckpt / name, content)
                self._maybe_pause("save", state.global_step, args.output_dir)
                manifest = write_complete_marker(ckpt, state.global_step)
                self.last_complete = ckpt
                size = sum(f["size"] for f in manifest["files"].values())
                self._event(state, "checkpoint", path=str(ckpt), bytes=size,
                            marker_s=round(time.time() - started, 3))
                prune_checkpoints(args.output_dir, self.keep, log=logger.info)
        if self._should_stop():
            # A signal that arrived during HF's save: this checkpoint is at the current step; stop here.
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._maybe_pause("final", state.global_step, args.output_dir)  # before the recipe saves the adapter
        self.stopped_early = self._should_stop() and state.global_step < state.max_steps
        if self.stopped_early and state.is_world_process_zero:  # rank 0 wrote the marker: it knows the path
            path = self.last_complete if self.last_complete and checkpoint_step(self.last_complete) == \
                state.global_step else None
            self._event(state, "stopped", signal=_signal_name(self._signum), checkpoint=str(path) if path else None)
            self.log(f"stopped by {_signal_name(self._signum)} at step {state.global_step}; complete checkpoint: "
                     f"{path or 'none at this step'}; run again with --resume auto to continue")


def __getattr__(name: str) -> Any:
    if name == "CheckpointCallback":
        from transformers import TrainerCallback

        cls = type("CheckpointCallback", (_CheckpointCallbackLogic, TrainerCallback),
                   {"__doc__": _CheckpointCallbackLogic.__doc__, "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
