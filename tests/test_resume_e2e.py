"""Never lose work, end to end: the real recipe (tiny Gemma-2, 4-bit, LoRA, TRL) in subprocesses, real signals.

Faults are placed with a test pause POINT@STEP:SECONDS (tests/run_paused.py, training/checkpoint_callback.py): the
trainer pauses at that point and drops `.test-paused-POINT-STEP` in the run folder, the test sends the signal there.
Runs use one thread each (OMP_NUM_THREADS=1) so that two can share the 2 CI cores and so that CPU float math is
reproducible from run to run. QLORA_E2E_KILL_TRIALS=N (default 1) sets how many random SIGKILLs the SIGKILL test
delivers to its second run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import optimizer_moment_layout
from training.checkpoints import (
    MARKER_NAME,
    find_latest_complete_checkpoint,
    is_complete_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from training.runfiles import read_records

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("tiny_model_dir")  # built once (conftest) before parallel runs would race
GRACE_S = 120  # docker-compose.training.yml stop_grace_period for the trainer
# Exact resume tolerance: none (bit for bit). Both runs use the same machine, binary and single thread, dropout is 0
# and the checkpoint restores adapter, optimizer, scheduler, RNG and data position, so nothing may differ. Any
# tolerance would hide real mis-restores: PEFT upcasting the bf16 adapter to fp32 on resume (fixed by
# keep_adapter_dtype_on_resume) showed up as 2 ulp (1.5e-7 relative) on the first loss after the resume point, 2e-5
# on the second; a wrong data position or a reset optimizer moves the loss by 1e-3 or more.
LOSS_RTOL = 0.0
WEIGHT_ATOL = 0.0


class Run:
    """One run name of the recipe under a test's tmp folder (outputs/<run>/, logs/<run>/metrics.jsonl)."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.out = root / "outputs" / name
        self.metrics = root / "logs" / name / "metrics.jsonl"
        self.n = 0

    def start(self, max_steps: int, resume: str = "auto", sets: dict | None = None, pause: str | None = None):
        sets = {"logging_steps": 1, "save_steps": 2, **(sets or {})}
        cli = [str(REPO / "tests" / "run_paused.py"), pause] if pause else ["-m", "training.qlora_finetune"]
        cmd = [sys.executable, *cli, "--model-config", "tiny", "--run-name", self.name,
               "--output-dir", str(self.out), "--logs-dir", str(self.root / "logs"), "--max-steps", str(max_steps),
               "--resume", resume]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        self.n += 1
        self.log_path = self.root / f"{self.name}.{self.n}.log"
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        proc.log_path = self.log_path
        return proc

    def run(self, *args, **kwargs) -> tuple[int, str]:
        proc = self.start(*args, **kwargs)
        rc = proc.wait(timeout=600)
        return rc, proc.log_path.read_text()

    def events(self, name: str) -> list[dict]:
        return [e for e in read_records(self.metrics) if e.get("event") == name]

    def losses(self) -> dict[int, float]:
        """step -> training loss; a resumed run's records overwrite the same steps of an earlier attempt."""
        return {e["step"]: e["loss"] for e in read_records(self.metrics) if "loss" in e and "event" not in e}


def wait_paused(proc, run: Run, point: str, step: int, timeout: float = 300) -> None:
    flag = run.out / f".test-paused-{point}-{step}"
    deadline = time.time() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before pausing at {point} {step}:\n"
                                 + proc.log_path.read_text()[-4000:])
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no pause at {point} {step} within {timeout}s")
        time.sleep(0.1)


def stop_with(proc, sig: int) -> tuple[int, float, str]:
    t0 = time.time()
    proc.send_signal(sig)
    rc = proc.wait(timeout=GRACE_S + 60)
    return rc, time.time() - t0, proc.log_path.read_text()


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_stopped_cleanly(run: Run, rc: int, seconds: float, log: str, step: int) -> Path:
    assert rc == 143, log[-4000:]
    assert seconds < GRACE_S, f"took {seconds:.0f}s to stop, over the {GRACE_S}s grace period"
    ckpt = run.out / f"checkpoint-{step}"
    assert is_complete_checkpoint(ckpt) == (True, "complete"), log[-4000:]
    assert find_latest_complete_checkpoint(run.out) == ckpt
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "run_config.json"} <= {p.name for p in ckpt.iterdir()}
    stopped = run.events("stopped")
    assert stopped and stopped[-1]["step"] == step and stopped[-1]["signal"] == "SIGTERM"
    assert not (run.out / "adapter").exists(), "a stopped run must not look finished"
    assert not [e for e in run.events("finished")]
    return ckpt


def test_exact_resume_after_sigterm_mid_step(tmp_path):
    """Uninterrupted vs SIGTERM during step 3 + `--resume auto`: same step count, same losses, same adapter. LoRA
    rank 64 gives the tiny model tensors of 4,096 elements and more: the optimizer's flat buffer holds them
    (training.optim), its smaller ones run per tensor, and both resume."""
    ref, cut = Run(tmp_path, "reference"), Run(tmp_path, "interrupted")
    sets = {"lora_r": 64}
    ref_proc = ref.start(6, resume="never", sets=sets)
    cut_proc = cut.start(6, resume="never", pause="step@3:300", sets=sets)
    wait_paused(cut_proc, cut, "step", 3)
    rc, seconds, log = stop_with(cut_proc, signal.SIGTERM)
    ckpt = assert_stopped_cleanly(cut, rc, seconds, log, step=3)
    assert "SIGTERM received" in log
    assert ref_proc.wait(timeout=600) == 0, ref.log_path.read_text()[-4000:]
    storages, eight_bit, thirty_two_bit = optimizer_moment_layout(ckpt / "optimizer.pt")
    assert storages == 1 and eight_bit > thirty_two_bit > 0  # one flat buffer, and 32-bit moments for the small ones

    rc, log = cut.run(6, resume="auto", sets=sets)
    assert rc == 0, log[-4000:]
    resumed = cut.events("resumed")
    assert len(resumed) == 1 and resumed[0]["step"] == 3 and resumed[0]["path"] == str(cut.out / "checkpoint-3")
    assert json.loads((cut.out / "run_summary.json").read_text())["steps"] == 6

    want, got = ref.losses(), cut.losses()
    assert sorted(want) == sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(got[step] - want[step]) <= LOSS_RTOL * abs(want[step]), (step, got, want)
    a, b = adapter_tensors(ref.out), adapter_tensors(cut.out)
    assert a.keys() == b.keys() and len(a) > 0
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= WEIGHT_ATOL, f"adapter weights differ by up to {worst}"
    # and the adapter actually trained (the comparison is not between two untouched initialisations)
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 0


def test_sigterm_during_evaluation_and_during_a_save(tmp_path):
    """SIGTERM while evaluating at step 4 (no save planned there) and while step 4's checkpoint is being written:
    both stop with a complete checkpoint-4; nothing partial is ever chosen for resume."""
    ev, sv = Run(tmp_path, "eval"), Run(tmp_path, "save")
    ev_proc = ev.start(8, resume="never", sets={"save_steps": 100, "eval_steps": 4}, pause="eval@4:300")
    sv_proc = sv.start(8, resume="never", sets={"save_steps": 4, "eval_steps": 100}, pause="save@4:300")
    wait_paused(ev_proc, ev, "eval", 4)
    rc, seconds, log = stop_with(ev_proc, signal.SIGTERM)
    assert_stopped_cleanly(ev, rc, seconds, log, step=4)
    assert [p.name for _, p in list_checkpoints(ev.out)] == ["checkpoint-4"]  # written only because of the stop

    wait_paused(sv_proc, sv, "save", 4)
    assert not (sv.out / "checkpoint-4" / MARKER_NAME).exists()  # the signal lands mid-save: files, no marker
    rc, seconds, log = stop_with(sv_proc, signal.SIGTERM)
    assert_stopped_cleanly(sv, rc, seconds, log, step=4)
    assert [p.name for _, p in list_checkpoints(sv.out)] == ["checkpoint-4"]


def test_sigkill_during_a_slow_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL while checkpoint-4 is being written: checkpoint-2 stays intact, the backup copies only it, resume
    skips the partial folder (with a warning naming it), continues from 2 with more max_steps (allowed, logged).
    Beside it, a second run with a checkpoint every step gets SIGKILLs at random moments
    (QLORA_E2E_KILL_TRIALS, default 1): after each, the newest complete checkpoint verifies (full hash) and is at
    least as new as the last `checkpoint` event; then it resumes and finishes."""
    run, chaos = Run(tmp_path, "killed"), Run(tmp_path, "chaos")
    trials = int(os.environ.get("QLORA_E2E_KILL_TRIALS", "1"))
    rng = random.Random(os.environ.get("QLORA_E2E_SEED", "0"))
    proc = run.start(6, resume="never", pause="save@4:300")
    chaos_proc = chaos.start(12, resume="never", sets={"save_steps": 1})

    wait_paused(proc, run, "save", 4)
    before = (run.out / "checkpoint-2" / MARKER_NAME).read_bytes()
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert verify_checkpoint(run.out / "checkpoint-2") == []
    assert (run.out / "checkpoint-2" / MARKER_NAME).read_bytes() == before
    assert (run.out / "checkpoint-4").is_dir() and not (run.out / "checkpoint-4" / MARKER_NAME).exists()

    backup = tmp_path / "backup"
    proc_b = subprocess.run([sys.executable, "-m", "training.backup", "run", "--source", str(run.out.parent),
                             "--dest", str(backup), "--once"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc_b.returncode == 0, proc_b.stdout
    assert [p.name for _, p in list_checkpoints(backup / "killed")] == ["checkpoint-2"]
    assert "skipping checkpoint-4" in proc_b.stdout

    resumed_proc = run.start(8, resume="auto")
    for trial in range(trials):
        seen = len(chaos.events("checkpoint"))
        deadline = time.time() + 300
        while len(chaos.events("checkpoint")) <= seen and chaos_proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        chaos_proc.kill()
        chaos_proc.wait(timeout=60)
        marked = chaos.events("checkpoint")[-1]
        latest = find_latest_complete_checkpoint(chaos.out)
        assert latest is not None, f"trial {trial}: no complete checkpoint left"
        assert verify_checkpoint(latest) == []
        assert int(latest.name.split("-")[1]) >= marked["step"], f"trial {trial}: lost {marked['path']}"
        chaos_proc = chaos.start(12, resume="auto", sets={"save_steps": 1})
    assert chaos_proc.wait(timeout=600) == 0, chaos_proc.log_path.read_text()[-4000:]
    assert json.loads((chaos.out / "run_summary.json").read_text())["steps"] == 12

    assert resumed_proc.wait(timeout=600) == 0, resumed_proc.log_path.read_text()[-4000:]
    log = resumed_proc.log_path.read_text()
    assert "skipping checkpoint-4" in log and "no COMPLETE marker" in log
    assert "changed setting (allowed): max_steps: 6 -> 8" in log
    resumed = run.events("resumed")
    assert resumed[-1]["path"] == str(run.out / "checkpoint-2") and resumed[-1]["step"] == 2
    assert json.loads((run.out / "run_summary.json").read_text())["steps"] == 8
    for _, ckpt in list_checkpoints(run.out):
        assert verify_checkpoint(ckpt) == [], ckpt  # the partial folder was replaced by a complete one


def test_killed_after_the_last_checkpoint_saves_without_training_further(tmp_path):
    """Killed between the checkpoint at max_steps and the final save (CI caught HF then training step 13 of 12):
    `--resume auto` writes the adapter of that checkpoint, trains nothing, and the summary holds the whole run."""
    run = Run(tmp_path, "late")
    rc, log = run.run(4, resume="never")
    assert rc == 0, log[-4000:]
    first = json.loads((run.out / "run_summary.json").read_text())
    final = adapter_tensors(run.out)
    shutil.rmtree(run.out / "adapter")  # the state a SIGKILL right after checkpoint-4's marker leaves
    (run.out / "run_summary.json").unlink()

    rc, log = run.run(4, resume="auto")
    assert rc == 0, log[-4000:]
    assert "checkpoint-4 is at step 4, max_steps is 4: saving its adapter without training" in log
    assert [p.name for _, p in list_checkpoints(run.out)] == ["checkpoint-2", "checkpoint-4"]
    summary = json.loads((run.out / "run_summary.json").read_text())
    assert summary["steps"] == 4
    assert (summary["train_loss_first"], summary["train_loss_last"]) == (first["train_loss_first"],
                                                                          first["train_loss_last"])
    again = adapter_tensors(run.out)
    assert again.keys() == final.keys()
    assert all(again[k].dtype == final[k].dtype and bool((again[k] == final[k]).all()) for k in final)
    assert run.events("resumed")[-1]["path"] == str(run.out / "checkpoint-4")
    assert len(run.events("finished")) == 2

    # The same command once more (`make train-tiny` twice): the run is finished, nothing is trained or rewritten.
    before = (run.out / "run_summary.json").read_bytes()
    rc, log = run.run(4, resume="auto")
    assert rc == 0, log[-4000:]
    assert "run late already finished at step 4" in log
    assert (run.out / "run_summary.json").read_bytes() == before
    assert len(run.events("finished")) == 2 and len(run.events("start")) == 2


def test_damaged_checkpoints_incompatible_resume_and_restore(tmp_path):
    """Truncated weights / missing trainer state: `--resume PATH` fails naming it, `--resume auto` skips them with
    a warning and starts fresh (saying so); a different LoRA rank is refused; the backup restores the run, which
    then resumes."""
    run = Run(tmp_path, "damaged")
    rc, log = run.run(4, resume="never")
    assert rc == 0, log[-4000:]
    assert [p.name for _, p in list_checkpoints(run.out)] == ["checkpoint-2", "checkpoint-4"]
    outputs, backup = tmp_path / "outputs", tmp_path / "backup"
    bk = [sys.executable, "-m", "training.backup"]
    assert subprocess.run(bk + ["run", "--source", str(outputs), "--dest", str(backup), "--once"], cwd=REPO,
                          capture_output=True, timeout=120).returncode == 0

    other = Run(tmp_path, "other-rank")
    shutil.copytree(run.out, other.out)
    weights = run.out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated weights
    state = run.out / "checkpoint-2" / "trainer_state.json"
    state.unlink()  # missing trainer state
    fresh = Run(tmp_path, "damaged-fresh")
    shutil.copytree(run.out, fresh.out)

    other_proc = other.start(6, resume="auto", sets={"lora_r": 4})
    path_proc = run.start(6, resume=str(run.out / "checkpoint-4"))
    assert other_proc.wait(timeout=600) == 2
    log = other_proc.log_path.read_text()
    assert "lora_r: checkpoint 8, now 4" in log and "Traceback" not in log
    assert [p.name for _, p in list_checkpoints(other.out)] == ["checkpoint-2", "checkpoint-4"]
    assert path_proc.wait(timeout=600) == 2
    log = path_proc.log_path.read_text()
    assert f"--resume {run.out / 'checkpoint-4'}" in log and str(weights) in log and "--resume auto" in log
    assert "Traceback" not in log and not run.events("resumed")

    fresh_proc = fresh.start(1, resume="auto")
    restore = subprocess.run(bk + ["restore", "--dest", str(backup), "--to", str(outputs), "damaged"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert restore.returncode == 0, restore.stdout
    assert verify_checkpoint(run.out / "checkpoint-4") == []
    restored_proc = run.start(6, resume="auto")

    assert fresh_proc.wait(timeout=600) == 0, fresh_proc.log_path.read_text()[-4000:]
    log = fresh_proc.log_path.read_text()
    assert f"skipping checkpoint-4: {fresh.out / 'checkpoint-4' / weights.name}: size 1000 bytes" in log
    assert f"skipping checkpoint-2: {fresh.out / 'checkpoint-2' / state.name}: missing" in log
    assert "no complete checkpoint" in log and "starting fresh" in log
    assert not fresh.events("resumed")
    assert json.loads((fresh.out / "run_summary.json").read_text())["steps"] == 1
    # the damaged folders were set aside (never deleted: they have a marker) and are no candidates any more
    assert sorted(p.name for p in fresh.out.glob("superseded-*/checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    assert restored_proc.wait(timeout=600) == 0, restored_proc.log_path.read_text()[-4000:]
    assert run.events("resumed")[-1]["step"] == 4
    assert json.loads((run.out / "run_summary.json").read_text())["steps"] == 6
