"""The backup sidecar, as the real command in real processes: only complete checkpoints, retention, verify,
restore, the lock between two processes, a full disk (a real 1 MiB tmpfs), stop signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from training.backup import TEST_FILE_DELAY_ENV
from training.checkpoints import (
    is_complete_checkpoint,
    list_checkpoints,
    read_manifest,
    resolve_resume,
    write_complete_marker,
)
from training.runfiles import BACKUP_EVENTS, BACKUP_LOCK, LAST_BACKUP, read_records

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(run_dir: Path, step: int, *, complete: bool = True, size: int = 20_000) -> Path:
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(size))
    (ckpt / "optimizer.pt").write_bytes(os.urandom(size))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_complete_marker(ckpt)
    return ckpt


def backup(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.backup", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def start_backup(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.backup", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **(env or {})))


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def backed_up(dest: Path, run: str) -> list[str]:
    return [p.name for _, p in list_checkpoints(dest / run)]


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.fixture
def dirs(tmp_path):
    src, dest = tmp_path / "outputs", tmp_path / "backup"
    src.mkdir()
    return src, dest


def test_only_complete_checkpoints_are_copied(dirs):
    src, dest = dirs
    for step in (1, 2):
        make_checkpoint(src / "runA", step)
    make_checkpoint(src / "runA", 3, complete=False)  # a save in progress
    truncated = make_checkpoint(src / "runA", 4)
    (truncated / "optimizer.pt").write_bytes(b"x")
    make_checkpoint(src / "runB", 5)
    (src / "not-a-run.txt").write_text("ignored")

    proc = backup("run", "--source", str(src), "--dest", str(dest), "--once")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert backed_up(dest, "runA") == ["checkpoint-1", "checkpoint-2"]
    assert backed_up(dest, "runB") == ["checkpoint-5"]
    assert "skipping checkpoint-3" in proc.stdout and "no COMPLETE marker" in proc.stdout
    assert "skipping checkpoint-4" in proc.stdout and "optimizer.pt" in proc.stdout
    for run, step in [("runA", 1), ("runA", 2), ("runB", 5)]:
        copy = dest / run / f"checkpoint-{step}"
        assert is_complete_checkpoint(copy) == (True, "complete")
        assert same_files(src / run / f"checkpoint-{step}", copy)
    last = json.loads((dest / "runA" / LAST_BACKUP).read_text())
    assert last["checkpoint"] == "checkpoint-2" and last["step"] == 2 and last["bytes"] > 0
    copied = [e for e in read_records(dest / BACKUP_EVENTS) if e["event"] == "copied"]
    assert sorted((e["run"], e["step"]) for e in copied) == [("runA", 1), ("runA", 2), ("runB", 5)]

    # a second round copies nothing new
    proc = backup("run", "--source", str(src), "--dest", str(dest), "--once")
    assert proc.returncode == 0 and "0 copied" in proc.stdout


def test_checkpoint_being_written_during_a_backup_round_is_not_copied(dirs):
    """A real concurrent writer: files of checkpoint-2 appear slowly while backup rounds run every second;
    no round copies it before its marker exists, and the first round after the marker copies it whole."""
    src, dest = dirs
    make_checkpoint(src / "run", 1)
    marked_at = {}

    def writer():
        ckpt = src / "run" / "checkpoint-2"
        ckpt.mkdir()
        for i in range(6):
            (ckpt / f"part-{i}.bin").write_bytes(os.urandom(50_000))
            time.sleep(0.5)
        write_complete_marker(ckpt)
        marked_at["t"] = time.time()

    proc = start_backup("run", "--source", str(src), "--dest", str(dest), "--interval", "1", "--keep", "5")
    try:
        wait_for(lambda: backed_up(dest, "run") == ["checkpoint-1"], what="first backup")
        t = threading.Thread(target=writer)
        t.start()
        while t.is_alive():
            copy = dest / "run" / "checkpoint-2"
            assert not copy.exists() or "t" in marked_at, "copied before its COMPLETE marker existed"
            time.sleep(0.05)
        wait_for(lambda: "checkpoint-2" in backed_up(dest, "run"), what="backup of checkpoint-2")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out and "skipping checkpoint-2" in out
    assert is_complete_checkpoint(dest / "run" / "checkpoint-2") == (True, "complete")
    assert same_files(src / "run" / "checkpoint-2", dest / "run" / "checkpoint-2")


def test_retention_keeps_newest_k_per_run(dirs):
    src, dest = dirs
    for step in (1, 2):
        make_checkpoint(src / "run", step)
    assert backup("run", "--source", str(src), "--dest", str(dest), "--once", "--keep", "3").returncode == 0
    for step in (3, 4, 5):
        make_checkpoint(src / "run", step)
    shutil.rmtree(src / "run" / "checkpoint-1")  # the trainer rotated it away; the backup keeps its own K
    proc = backup("run", "--source", str(src), "--dest", str(dest), "--once", "--keep", "3")
    assert proc.returncode == 0, proc.stdout
    assert backed_up(dest, "run") == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert "pruned" in proc.stdout
    assert not [p for p in (dest / "run").iterdir() if p.name.startswith((".tmp", ".trash"))]
    # the env default is honoured (BACKUP_KEEP)
    make_checkpoint(src / "run", 6)
    proc = backup("run", "--source", str(src), "--dest", str(dest), "--once", env={"BACKUP_KEEP": "2"})
    assert proc.returncode == 0 and backed_up(dest, "run") == ["checkpoint-5", "checkpoint-6"]


def test_verify_reports_every_damaged_file(dirs):
    src, dest = dirs
    for step in (1, 2, 3):
        make_checkpoint(src / "run", step)
    assert backup("run", "--source", str(src), "--dest", str(dest), "--once").returncode == 0
    ok = backup("verify", "--dest", str(dest))
    assert ok.returncode == 0 and "3 checkpoint(s): 0 damaged" in ok.stdout

    flipped = dest / "run" / "checkpoint-2" / "adapter_model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[12345] ^= 0x10
    flipped.write_bytes(bytes(data))
    missing = dest / "run" / "checkpoint-3" / "trainer_state.json"
    missing.unlink()
    proc = backup("verify", "--dest", str(dest))
    assert proc.returncode == 1
    assert f"DAMAGED {flipped}: SHA-256 differs" in proc.stdout
    assert f"DAMAGED {missing}: missing" in proc.stdout
    assert "3 checkpoint(s): 2 damaged" in proc.stdout
    assert backup("verify", "--dest", str(dest / "nope")).returncode == 2


def test_restore_round_trips_and_refuses_damage(dirs, tmp_path):
    src, dest = dirs
    for step in (1, 2):
        make_checkpoint(src / "run", step)
    assert backup("run", "--source", str(src), "--dest", str(dest), "--once").returncode == 0
    lost = tmp_path / "new-disk"

    proc = backup("restore", "--dest", str(dest), "--to", str(lost), "run")
    assert proc.returncode == 0, proc.stdout
    restored = lost / "run" / "checkpoint-2"
    assert same_files(src / "run" / "checkpoint-2", restored)
    assert resolve_resume("auto", lost / "run", log=lambda m: None) == restored  # the run resumes from it
    assert "--resume" in proc.stdout

    # a named checkpoint, and an incomplete leftover at the target is replaced
    (lost / "run" / "checkpoint-1").mkdir()
    (lost / "run" / "checkpoint-1" / "optimizer.pt").write_bytes(b"half")
    proc = backup("restore", "--dest", str(dest), "--to", str(lost), "run", "1")
    assert proc.returncode == 0, proc.stdout
    assert same_files(src / "run" / "checkpoint-1", lost / "run" / "checkpoint-1")

    # a damaged backup is never restored: named -> error; default -> the next intact one
    victim = dest / "run" / "checkpoint-2" / "optimizer.pt"
    victim.write_bytes(b"\0" * victim.stat().st_size)
    again = tmp_path / "again"
    proc = backup("restore", "--dest", str(dest), "--to", str(again), "run", "checkpoint-2")
    assert proc.returncode == 1 and f"DAMAGED {victim}" in proc.stdout and not (again / "run" / "checkpoint-2").exists()
    proc = backup("restore", "--dest", str(dest), "--to", str(again), "run")
    assert proc.returncode == 0 and "skipping damaged backup" in proc.stdout
    assert backed_up(again, "run") == ["checkpoint-1"]
    proc = backup("restore", "--dest", str(dest), "--to", str(again), "other-run")
    assert proc.returncode == 2 and "runs backed up: run" in proc.stdout


def test_two_backup_processes_do_not_both_copy(dirs):
    src, dest = dirs
    for step in (1, 2, 3):
        make_checkpoint(src / "run", step)
    slow = {TEST_FILE_DELAY_ENV: "0.3"}  # test-only: ~1 s per checkpoint so the second process arrives mid-copy
    first = start_backup("run", "--source", str(src), "--dest", str(dest), "--once", env=slow)
    wait_for(lambda: any(p.name.startswith(".tmp-") for p in (dest / "run").glob("*")) if (dest / "run").exists()
             else False, what="first copy to start")
    second = start_backup("run", "--source", str(src), "--dest", str(dest), "--once", env=slow)
    out1, out2 = first.communicate(timeout=60)[0], second.communicate(timeout=60)[0]
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    assert f"waiting for {dest / BACKUP_LOCK}, held by pid {first.pid}" in out2
    copied = [e for e in read_records(dest / BACKUP_EVENTS) if e["event"] == "copied"]
    assert sorted(e["step"] for e in copied) == [1, 2, 3], "each checkpoint copied exactly once"
    assert "3 copied" in out1 and "0 copied" in out2
    # a loop-mode sidecar finding the lock busy skips its round instead of copying alongside
    holder = start_backup("run", "--source", str(src), "--dest", str(dest), "--once", env=slow)
    make_checkpoint(src / "run", 4)
    wait_for(lambda: any(p.name.startswith(".tmp-") for p in (dest / "run").glob("*")), what="holder copying")
    looper = start_backup("run", "--source", str(src), "--dest", str(dest), "--interval", "600")
    wait_for(lambda: (dest / BACKUP_LOCK).read_text().startswith(f"pid {holder.pid}"), what="lock file")
    time.sleep(1.0)
    looper.send_signal(signal.SIGTERM)
    out3 = looper.communicate(timeout=30)[0]
    holder.communicate(timeout=60)
    assert looper.returncode == 0 and "skipping this round" in out3 and "copied" not in out3


def test_sigterm_during_a_copy_removes_the_partial_copy(dirs):
    src, dest = dirs
    make_checkpoint(src / "run", 1)
    assert backup("run", "--source", str(src), "--dest", str(dest), "--once").returncode == 0
    make_checkpoint(src / "run", 2)
    proc = start_backup("run", "--source", str(src), "--dest", str(dest), "--once", env={TEST_FILE_DELAY_ENV: "2"})
    wait_for(lambda: any(p.name.startswith(".tmp-") for p in (dest / "run").iterdir()), what="copy to start")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM during a copy" in out
    assert [p.name for p in (dest / "run").iterdir() if not p.name.endswith(".json")] == ["checkpoint-1"]
    assert backup("verify", "--dest", str(dest)).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs as the backup volume."""
    mnt = tmp_path / f"small-disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs to fill a disk (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_backup_disk_fails_cleanly_and_keeps_earlier_backups(tmp_path, tiny_disk):
    src = tmp_path / "outputs"
    make_checkpoint(src / "run", 1, size=100_000)
    first = backup("run", "--source", str(src), "--dest", str(tiny_disk), "--once")
    assert first.returncode == 0, first.stdout
    make_checkpoint(src / "run", 2, size=2_000_000)  # ~4 MB: cannot fit in 1 MiB
    proc = backup("run", "--source", str(src), "--dest", str(tiny_disk), "--once")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"backup volume {tiny_disk / 'run'} is full" in proc.stdout
    assert "earlier backups are intact" in proc.stdout and "--keep" in proc.stdout
    assert backed_up(tiny_disk, "run") == ["checkpoint-1"]
    assert not [p for p in (tiny_disk / "run").iterdir() if p.name.startswith(".tmp")], "partial copy left behind"
    assert backup("verify", "--dest", str(tiny_disk)).returncode == 0
    failed = [e for e in read_records(tiny_disk / BACKUP_EVENTS) if e["event"] == "failed"]
    assert failed and failed[-1]["disk_full"] is True and failed[-1]["checkpoint"] == "checkpoint-2"
    assert read_manifest(tiny_disk / "run" / "checkpoint-1") == read_manifest(src / "run" / "checkpoint-1")

    # completely full (not even room for the event record): still a clear error, no traceback, backups intact
    with open(tiny_disk / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    proc = backup("run", "--source", str(src), "--dest", str(tiny_disk), "--once")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "is full" in proc.stdout
    (tiny_disk / "filler").unlink()
    assert backup("verify", "--dest", str(tiny_disk)).returncode == 0


def test_bad_arguments_are_errors_for_people(dirs):
    src, dest = dirs
    proc = backup("run", "--source", str(src / "missing"), "--dest", str(dest), "--once")
    assert proc.returncode == 2 and "--source" in proc.stdout and "Traceback" not in proc.stderr
    proc = backup("run", "--source", str(src), "--dest", str(dest), "--once", env={"BACKUP_KEEP": "many"})
    assert proc.returncode != 0 and "BACKUP_KEEP='many'" in proc.stderr and "Traceback" not in proc.stderr
