"""Backup sidecar: copies complete checkpoints to the backup volume, verified; plus `verify` and `restore`.

    python -m training.backup run --source outputs --dest backup [--once] [--keep K] [--interval S]
    python -m training.backup verify --dest backup
    python -m training.backup restore --dest backup --to outputs RUN [CHECKPOINT]

Source layout `<source>/<run>/checkpoint-N/`, backup layout `<dest>/<run>/checkpoint-N/`. Only folders with a
`COMPLETE` marker are copied (training/checkpoints.py). Each copy goes to `<dest>/<run>/.tmp-checkpoint-N-<pid>/`,
is checked against the manifest (size + SHA-256 of every file, re-read from the backup disk), and is then renamed
into place: a backup folder without the `.tmp-` prefix is always whole. Newest K backups per run are kept (by the
time the checkpoint was marked complete). An flock on `<dest>/.backup.lock` makes sure only one process copies,
prunes or restores at a time. State for the status tool: `<dest>/backup_events.jsonl` and
`<dest>/<run>/LAST_BACKUP.json` (docs/contracts.md). Log lines go to stdout (the container log).

Limits: the newest K complete checkpoints per run are copied each round, so checkpoints written and rotated away
between two rounds are never backed up (one per interval is the point). Copy-then-prune needs room for K+1
checkpoints per run on the backup volume.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from training.checkpoints import (
    MARKER_NAME,
    fsync_dir,
    is_complete_checkpoint,
    iter_complete_checkpoints,
    list_checkpoints,
    read_manifest,
    remove_leftovers,
    remove_tree_atomically,
    sha256_file,
    verify_checkpoint,
)
from training.disk import free_bytes
from training.jsonio import append_jsonl, write_json_atomic
from training.runfiles import BACKUP_EVENTS, BACKUP_LOCK, BACKUP_TMP_PREFIX, CHECKPOINT_PREFIX, LAST_BACKUP
from training.stop_signal import StopSignal
from training.errors import UserError

DEFAULT_INTERVAL_S = 3600  # one checkpoint interval of work at most is lost if the training disk dies
DEFAULT_KEEP = 5  # per run; the backup volume needs room for keep+1 checkpoints of each run
# Test-only hook: seconds to sleep after each copied file, so tests can catch a copy in progress.
TEST_FILE_DELAY_ENV = "QLORA_TEST_BACKUP_FILE_DELAY"


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} backup: {msg}", flush=True)


class BackupError(UserError):
    """A problem the user must know about; the message says what, where and what to do."""


class DiskFullError(BackupError):
    pass


class Stopped(Exception):
    """A stop signal arrived during a copy; the temp copy has been removed."""


# ---------------------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------------------


class BackupLock:
    """flock on `<dest>/.backup.lock`; released by the kernel if the holder dies, so it is never stale."""

    def __init__(self, dest: Path):
        self.path = dest / BACKUP_LOCK
        self.fd: int | None = None

    def acquire(self, wait: bool) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text(errors="replace").strip() or "another process"
            if not wait:
                os.close(fd)
                log(f"another backup holds {self.path} ({holder}); skipping this round")
                return False
            log(f"waiting for {self.path}, held by {holder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # who holds it, for the "waiting for" message; best effort (a full disk must not stop us here)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        except OSError:
            pass
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------------------------
# One verified copy
# ---------------------------------------------------------------------------------------------------------------


def _disk_full_message(dest: Path, src: Path, manifest: dict[str, Any]) -> str:
    need = sum(f["size"] for f in manifest["files"].values())
    try:
        free = free_bytes(dest)[0]
    except OSError:
        free = -1
    return (f"backup volume {dest} is full: copying {src} needs {need / 2**20:.1f} MiB, "
            f"{max(free, 0) / 2**20:.1f} MiB free. The partial copy was removed; earlier backups are intact. "
            f"Free space on the backup volume or lower --keep / BACKUP_KEEP.")


def copy_checkpoint_verified(src: Path, dst: Path, stop: Callable[[], bool] = lambda: False) -> int:
    """Copy a complete checkpoint to `dst` through a temp folder, verified against its manifest; returns bytes.

    Raises BackupError (source changed or damaged), DiskFullError, FileNotFoundError (source rotated away
    meanwhile), Stopped. On any failure the temp folder is removed and `dst` is untouched.
    """
    manifest = read_manifest(src)
    if manifest is None:
        raise BackupError(f"{src}: no readable {MARKER_NAME} marker")
    marker_bytes = (src / MARKER_NAME).read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{BACKUP_TMP_PREFIX}{dst.name}-{os.getpid()}")
    delay = float(os.environ.get(TEST_FILE_DELAY_ENV) or 0)

    def check_stop() -> None:
        if stop():
            raise Stopped()
    total = 0
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for rel, want in sorted(manifest["files"].items()):
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as fout:
                size, digest = sha256_file(src / rel, copy_to=fout, each_chunk=check_stop)
                fout.flush()
                os.fsync(fout.fileno())
            if size != want["size"] or digest != want["sha256"]:
                raise BackupError(f"{src / rel} does not match its manifest (size {size}, manifest {want['size']}): "
                                  f"the source checkpoint is damaged or changed; not backed up. Check the training "
                                  f"disk; `python -m training.backup verify` checks the backups.")
            total += size
            if delay:
                time.sleep(delay)
            if stop():
                raise Stopped()
        for d in sorted({(tmp / rel).parent for rel in manifest["files"]}, reverse=True):
            fsync_dir(d)
        with open(tmp / MARKER_NAME, "wb") as fh:
            fh.write(marker_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        problems = verify_checkpoint(tmp, level="full")
        if problems:
            raise BackupError("the copy does not match the manifest after writing: " + "; ".join(problems))
        if dst.exists():
            remove_tree_atomically(dst)
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        return total
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(_disk_full_message(dst.parent, src, manifest)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# A backup round
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    copied: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    disk_full: bool = False


def _created(path: Path) -> tuple[float, int]:
    manifest = read_manifest(path) or {}
    return float(manifest.get("created") or 0.0), int(manifest.get("step") or 0)


def _dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def complete_checkpoints(run_dir: Path, level: str = "sizes", quiet: bool = False) -> list[Path]:
    """Complete checkpoint folders of one run, oldest first by the time they were marked; logs the others."""
    out = []
    for ckpt in iter_complete_checkpoints(run_dir, level=level, newest_first=False):
        if ckpt.complete:
            out.append(ckpt.path)
        elif not quiet:
            log(f"skipping {ckpt.path.name}: {ckpt.problem}")
    return sorted(out, key=_created)


def _event(dest: Path, event: str, **fields: Any) -> None:
    try:
        append_jsonl(dest / BACKUP_EVENTS, {"ts": time.time(), "event": event, **fields})
    except OSError as exc:  # a full backup volume must not turn a logged failure into a crash
        log(f"could not record the {event!r} event in {dest / BACKUP_EVENTS}: {exc}")


def prune_backups(run_backup: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete backups of one run; delete older ones and stray temp folders."""
    removed = []
    complete = complete_checkpoints(run_backup, quiet=True)
    for path in complete[:-keep] if keep > 0 else []:
        remove_tree_atomically(path)
        removed.append(path)
        log(f"pruned {path} (keeping the newest {keep})")
    return removed


def backup_round(source: Path, dest: Path, keep: int, stop: Callable[[], bool] = lambda: False) -> RoundResult:
    """Copy the newest `keep` complete checkpoints of every run not yet in the backup, then prune. Caller holds the
    lock."""
    result = RoundResult()
    if not source.is_dir():
        raise BackupError(f"--source {source}: no such folder (the checkpoints volume; e.g. outputs/)")
    for run_dir in _dirs(source):
        if not list_checkpoints(run_dir):
            continue
        run_backup = dest / run_dir.name
        run_backup.mkdir(parents=True, exist_ok=True)
        for leftover in run_backup.glob(f"{BACKUP_TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
            log(f"removed {leftover}, a partial copy left by an interrupted backup")
        remove_leftovers(run_backup)
        for src in complete_checkpoints(run_dir)[-keep:]:
            dst = run_backup / src.name
            src_manifest = read_manifest(src)
            dst_manifest = read_manifest(dst) if dst.is_dir() else None
            if dst_manifest is not None and dst_manifest.get("files") == src_manifest.get("files"):
                continue
            if dst.exists():
                log(f"{dst} differs from {src} (a newer run with the same name?): replacing it")
            started = time.time()
            try:
                size = copy_checkpoint_verified(src, dst, stop)
            except FileNotFoundError as exc:
                log(f"skipping {src}: it disappeared during the copy (rotated by the trainer?): {exc.filename}")
                continue
            except DiskFullError as exc:
                log(f"ERROR: {exc}")
                _event(dest, "failed", run=run_dir.name, checkpoint=src.name, error=str(exc), disk_full=True)
                result.failed.append(str(src))
                result.disk_full = True
                return result
            except BackupError as exc:
                log(f"ERROR: {exc}")
                _event(dest, "failed", run=run_dir.name, checkpoint=src.name, error=str(exc))
                result.failed.append(str(src))
                continue
            seconds = round(time.time() - started, 3)
            step = src_manifest.get("step")
            log(f"copied {src} -> {dst} ({size / 2**20:.1f} MiB in {seconds}s, verified)")
            record = {"run": run_dir.name, "checkpoint": src.name, "step": step, "path": str(dst),
                      "source": str(src), "bytes": size, "seconds": seconds}
            _event(dest, "copied", **record)
            try:
                write_json_atomic(run_backup / LAST_BACKUP, {"ts": time.time(), **record})
            except OSError as exc:
                log(f"could not write {run_backup / LAST_BACKUP}: {exc}")
            result.copied.append(str(src))
        for path in prune_backups(run_backup, keep):
            _event(dest, "pruned", run=run_dir.name, checkpoint=path.name)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    source, dest = Path(args.source), Path(args.dest)
    stop = StopSignal().install()  # a flag the copy loop checks between chunks (compose stop)
    dest.mkdir(parents=True, exist_ok=True)
    lock = BackupLock(dest)
    log(f"watching {source} -> {dest}, keep {args.keep} per run"
        + ("" if args.once else f", every {args.interval}s"))
    while True:
        if not lock.acquire(wait=args.once):
            result = None
        else:
            try:
                result = backup_round(source, dest, args.keep, stop)
            except Stopped:
                log(f"stopped by {signal.Signals(stop.signum).name} during a copy; partial copy removed, earlier "
                    f"backups intact")
                return 128 + stop.signum
            except BackupError as exc:
                log(f"ERROR: {exc}")
                if args.once:
                    return 2
                result = None
            except OSError as exc:  # e.g. the backup volume full or read-only outside a copy
                log(f"ERROR: {exc.strerror or exc} ({exc.filename or dest}); earlier backups are intact")
                if args.once:
                    return 1
                result = None
            finally:
                lock.release()
        if result is not None:
            _event(dest, "round", copied=len(result.copied), failed=len(result.failed))
            log(f"round done: {len(result.copied)} copied, {len(result.failed)} failed")
        if args.once:
            return 1 if result is None or result.failed else 0
        if stop.wait(args.interval):
            log(f"stopped by {signal.Signals(stop.signum).name}")
            return 0


def cmd_verify(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    if not dest.is_dir():
        log(f"ERROR: --dest {dest}: no such folder")
        return 2
    lock = BackupLock(dest)
    lock.acquire(wait=True)
    try:
        checked = damaged = 0
        runs = [dest / args.run] if args.run else _dirs(dest)
        for run_backup in runs:
            for _, path in list_checkpoints(run_backup):
                checked += 1
                problems = verify_checkpoint(path, level="full")
                if problems:
                    damaged += 1
                    for problem in problems:
                        log(f"DAMAGED {problem}")
                else:
                    log(f"ok {path}")
        _event(dest, "verified", checked=checked, damaged=damaged)
    finally:
        lock.release()
    if checked == 0:
        log(f"no backups found in {dest}")
    log(f"verified {checked} checkpoint(s): {damaged} damaged")
    return 1 if damaged else 0


def cmd_restore(args: argparse.Namespace) -> int:
    dest, to = Path(args.dest), Path(args.to)
    run_backup = dest / args.run
    if not run_backup.is_dir():
        runs = ", ".join(p.name for p in _dirs(dest)) or "none"
        log(f"ERROR: no backups of run {args.run!r} in {dest} (runs backed up: {runs})")
        return 2
    lock = BackupLock(dest)
    lock.acquire(wait=True)
    try:
        if args.checkpoint:
            name = (args.checkpoint if args.checkpoint.startswith(CHECKPOINT_PREFIX)
                    else f"{CHECKPOINT_PREFIX}{args.checkpoint}")
            src = run_backup / name
            if not src.is_dir():
                have = ", ".join(p.name for _, p in list_checkpoints(run_backup)) or "none"
                log(f"ERROR: {src} does not exist (backups of {args.run}: {have})")
                return 2
            problems = verify_checkpoint(src, level="full")
            if problems:
                for problem in problems:
                    log(f"DAMAGED {problem}")
                log(f"ERROR: backup {src} is damaged; restore another checkpoint of {args.run}")
                return 1
        else:
            src = None
            for cand in reversed(complete_checkpoints(run_backup, quiet=True)):
                problems = verify_checkpoint(cand, level="full")
                if not problems:
                    src = cand
                    break
                for problem in problems:
                    log(f"skipping damaged backup: {problem}")
            if src is None:
                log(f"ERROR: no intact backup of run {args.run} in {run_backup}")
                return 1
        target = to / args.run / src.name
        if target.exists():
            if is_complete_checkpoint(target, level="full")[0]:
                if (read_manifest(target) or {}).get("files") == (read_manifest(src) or {}).get("files"):
                    log(f"{target} is already there and intact; nothing to restore. Resume with --resume {target}")
                    return 0
                log(f"ERROR: {target} exists and differs from the backup {src}; move it away first, or restore "
                    f"another checkpoint")
                return 1
            log(f"{target} exists but is not a complete checkpoint: replacing it with the backup")
        try:
            size = copy_checkpoint_verified(src, target)
        except BackupError as exc:
            log(f"ERROR: {exc}")
            return 1
        _event(dest, "restored", run=args.run, checkpoint=src.name, path=str(target), bytes=size)
        log(f"restored {src} -> {target} ({size / 2**20:.1f} MiB, verified). Resume with --resume {target} "
            f"(or --resume auto if it is the newest complete checkpoint of the run)")
        return 0
    finally:
        lock.release()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"backup: {name}={raw!r} is not a whole number (seconds/count); fix it in .env") from None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.backup", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="copy new complete checkpoints now and then every --interval seconds")
    r.add_argument("--source", required=True, help="checkpoints folder: <source>/<run>/checkpoint-N/")
    r.add_argument("--dest", required=True, help="backup folder: <dest>/<run>/checkpoint-N/")
    r.add_argument("--once", action="store_true", help="one round, then exit (waits for a running backup first)")
    r.add_argument("--keep", type=int, default=_env_int("BACKUP_KEEP", DEFAULT_KEEP),
                   help="backups kept per run (env BACKUP_KEEP, default %(default)s)")
    r.add_argument("--interval", type=int, default=_env_int("BACKUP_INTERVAL", DEFAULT_INTERVAL_S),
                   help="seconds between rounds (env BACKUP_INTERVAL, default %(default)s)")
    v = sub.add_parser("verify", help="re-hash every backed-up file; non-zero exit if any is damaged")
    v.add_argument("--dest", required=True)
    v.add_argument("--run", help="only this run")
    s = sub.add_parser("restore", help="copy a backed-up checkpoint back into the checkpoints folder, verified")
    s.add_argument("--dest", required=True, help="backup folder")
    s.add_argument("--to", required=True, help="checkpoints folder (e.g. outputs/)")
    s.add_argument("run", help="run name")
    s.add_argument("checkpoint", nargs="?", help="checkpoint-N or N (default: the newest intact backup)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.command == "run":
        if args.keep < 1:
            log(f"ERROR: --keep {args.keep}: keep at least 1 backup per run")
            return 2
        if args.interval < 1:
            log(f"ERROR: --interval {args.interval}: give seconds >= 1")
            return 2
        return cmd_run(args)
    if args.command == "verify":
        return cmd_verify(args)
    return cmd_restore(args)


if __name__ == "__main__":
    sys.exit(main())
