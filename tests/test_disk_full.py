"""A full disk, for real: the run folder on a small tmpfs (CI runs as root) that another writer fills mid-run.

The trainer pauses at a point (tests/run_paused.py, training/checkpoint_callback.py), the test fills the tmpfs with a ballast
file leaving less than a checkpoint free, and the run hits ENOSPC in its next save: in checkpoint 2 (step 4) or in
the final adapter. Then: exit 2 without a traceback, the message names the folder and the free space, no partial
folder left, the earlier checkpoint intact, a `failed` event with reason `disk_full`; after the ballast is removed
the same command resumes and ends with the adapter an uninterrupted run writes, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_resume_e2e import Run, adapter_tensors, wait_paused
from training.checkpoints import MARKER_NAME, list_checkpoints, verify_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_model_dir")]
KEEP_FREE = 100_000  # bytes left free for the run: less than one tiny checkpoint (~240 KB)


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted under the test's folder (needs root: CI has it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); run as root to test a full disk for real")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); CI can")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


class DiskRun(Run):
    """A run whose output folder is on `disk` while its logs stay on the test's normal folder."""

    def __init__(self, root: Path, name: str, disk: Path):
        super().__init__(root, name)
        self.out = disk / name


def fill(disk: Path, keep_free: int = KEEP_FREE) -> Path:
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * max(free - keep_free, 0))
    return ballast


def assert_disk_full_stop(run: Run, rc: int, log: str, folder: str) -> None:
    assert rc == 2, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert f"disk full while writing {run.out / folder}" in log and "MiB free on the disk of" in log, log[-3000:]
    assert "--set keep_checkpoints=1" in log and "--output-dir" in log
    failed = run.events("failed")
    assert failed and failed[-1]["reason"] == "disk_full" and "DiskFullError" in failed[-1]["error"]


def test_disk_full_during_a_checkpoint_and_the_final_save_then_resume(tmp_path, tmpfs):
    ref = Run(tmp_path, "reference")
    mid = DiskRun(tmp_path, "mid", tmpfs)
    ref_proc = ref.start(6, resume="never")
    proc = mid.start(6, resume="never", pause="step@4:8")  # checkpoint-2 is complete; checkpoint-4 comes next
    wait_paused(proc, mid, "step", 4)
    assert verify_checkpoint(mid.out / "checkpoint-2") == []
    before = (mid.out / "checkpoint-2" / MARKER_NAME).read_bytes()
    ballast = fill(tmpfs)
    rc = proc.wait(timeout=600)
    log = proc.log_path.read_text()
    assert_disk_full_stop(mid, rc, log, "checkpoint-4")
    assert "checkpoint-2 is intact" in log
    assert [p.name for _, p in list_checkpoints(mid.out)] == ["checkpoint-2"]  # no partial checkpoint-4
    assert verify_checkpoint(mid.out / "checkpoint-2") == []
    assert (mid.out / "checkpoint-2" / MARKER_NAME).read_bytes() == before
    assert not (mid.out / "adapter").exists() and not mid.events("finished")

    ballast.unlink()  # space freed: the same command resumes from checkpoint-2 and finishes
    rc, log = mid.run(6, resume="auto")
    assert rc == 0, log[-4000:]
    assert mid.events("resumed")[-1]["path"] == str(mid.out / "checkpoint-2")
    assert ref_proc.wait(timeout=600) == 0, ref.log_path.read_text()[-4000:]
    want, got = adapter_tensors(ref.out), adapter_tensors(mid.out)
    assert want.keys() == got.keys() and all(bool((want[k] == got[k]).all()) for k in want)

    # The final save: checkpoint-6 is complete, the adapter does not fit.
    shutil.rmtree(mid.out)
    fin = DiskRun(tmp_path, "final", tmpfs)
    proc = fin.start(6, resume="never", pause="final@6:8")
    wait_paused(proc, fin, "final", 6)
    ballast = fill(tmpfs, keep_free=4096)
    rc = proc.wait(timeout=600)
    log = proc.log_path.read_text()
    assert_disk_full_stop(fin, rc, log, ".tmp-adapter")
    assert not (fin.out / "adapter").exists() and not (fin.out / ".tmp-adapter").exists()
    assert verify_checkpoint(fin.out / "checkpoint-6") == []
    ballast.unlink()
    rc, log = fin.run(6, resume="auto")
    assert rc == 0, log[-4000:]
    assert "checkpoint-6 is at step 6, max_steps is 6: saving its adapter without training" in log
    got = adapter_tensors(fin.out)
    assert want.keys() == got.keys() and all(bool((want[k] == got[k]).all()) for k in want)


def test_disk_preflight_refuses_a_run_that_cannot_fit(tmp_path, tmpfs, tiny_model_dir):
    from training.disk import estimate_run_bytes
    from training.qlora_config import resolve_config

    run = DiskRun(tmp_path, "small", tmpfs)
    small = resolve_config("tiny", set_items=["max_steps=2", "save_steps=2", "logging_steps=1", "keep_checkpoints=1"])
    need = estimate_run_bytes(small, str(tiny_model_dir), run.out)["total"]
    fill(tmpfs, keep_free=int(need / 0.95))  # room for a run keeping one checkpoint (tight), not for one keeping three
    rc, log = run.run(60, resume="never", sets={"save_steps": 20})
    assert rc == 2 and "Traceback" not in log, log[-4000:]
    assert f"not enough disk space for run folder {run.out}" in log
    assert "3 checkpoint(s) at once x" in log and "keep_checkpoints=3" in log and "MiB free on the disk of" in log
    assert "--set disk_check=false" in log
    assert run.events("failed")[-1]["reason"] == "disk_full"
    assert not run.out.exists() or not list_checkpoints(run.out)
    t0 = time.time()
    rc, log = run.run(2, resume="never", sets={"save_steps": 2, "keep_checkpoints": 1})
    assert rc == 0, log[-4000:]  # one checkpoint fits: the same disk takes a run that keeps one
    assert f"disk space is tight for {run.out}: the run needs about" in log
    assert time.time() - t0 < 300
