"""Complete-checkpoint markers, finding/choosing checkpoints, and the stop-signal callback inside a real HF Trainer.

Real files, real processes, real signals. The Trainer tests use a tiny torch model (not the recipe) so they test
training/checkpoints.py alone; the recipe end to end is tests/test_resume_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from training.checkpoints import (
    MARKER_NAME,
    CheckpointError,
    check_resume_compatible,
    find_latest_complete_checkpoint,
    is_complete_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_manifest,
    remove_tree_atomically,
    resolve_resume,
    set_aside_later_checkpoints,
    verify_checkpoint,
    write_complete_marker,
)
from training.runfiles import read_records

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(run_dir: Path, step: int, *, complete: bool = True, size: int = 4096, run_config=None) -> Path:
    """A checkpoint-shaped folder of real files (random bytes), marked complete if asked."""
    ckpt = run_dir / f"checkpoint-{step}"
    (ckpt / "sub").mkdir(parents=True, exist_ok=True)
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(size))
    (ckpt / "optimizer.pt").write_bytes(os.urandom(size * 2))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpt / "sub" / "extra.bin").write_bytes(os.urandom(100))
    if run_config is not None:
        (ckpt / "run_config.json").write_text(json.dumps(run_config))
    if complete:
        write_complete_marker(ckpt)
    return ckpt


class Logs(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


# ------------------------------------------------------------------------------------------------- the marker


def test_marker_holds_the_contract_manifest(tmp_path):
    ckpt = make_checkpoint(tmp_path, 7)
    manifest = json.loads((ckpt / MARKER_NAME).read_text())
    assert manifest["step"] == 7
    assert abs(manifest["created"] - time.time()) < 60
    assert set(manifest["files"]) == {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json",
                                      "sub/extra.bin"}
    for rel, info in manifest["files"].items():
        data = (ckpt / rel).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert is_complete_checkpoint(ckpt) == (True, "complete")
    assert not [p for p in ckpt.iterdir() if ".tmp" in p.name], "temp marker left behind"


def test_incomplete_checkpoints_are_named_with_the_reason(tmp_path):
    no_marker = make_checkpoint(tmp_path, 1, complete=False)
    ok, reason = is_complete_checkpoint(no_marker)
    assert not ok and "no COMPLETE marker" in reason and str(no_marker) in reason

    truncated = make_checkpoint(tmp_path, 2)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for level in ("full", "sizes"):
        ok, reason = is_complete_checkpoint(truncated, level=level)
        assert not ok and str(weights) in reason and "size 100" in reason

    missing = make_checkpoint(tmp_path, 3)
    (missing / "trainer_state.json").unlink()
    ok, reason = is_complete_checkpoint(missing)
    assert not ok and str(missing / "trainer_state.json") in reason and "missing" in reason

    garbled = make_checkpoint(tmp_path, 4)
    (garbled / MARKER_NAME).write_text('{"step": 4, "files": ')
    ok, reason = is_complete_checkpoint(garbled)
    assert not ok and "unreadable" in reason


def test_flipped_byte_found_by_full_check_only(tmp_path):
    ckpt = make_checkpoint(tmp_path, 5)
    target = ckpt / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert is_complete_checkpoint(ckpt, level="sizes")[0], "sizes check is stat-only by design"
    problems = verify_checkpoint(ckpt, level="full")
    assert problems == [f"{target}: SHA-256 differs from the manifest (corrupted)"]


def test_marker_written_last_even_when_killed_while_marking(tmp_path):
    """SIGKILL at several moments while a big folder is being fsynced+hashed: the marker is either absent or
    describes every file correctly; never a marker over a partial folder, never a half-written marker."""
    script = textwrap.dedent("""
        import sys, os
        from training.checkpoints import write_complete_marker
        print("ready", flush=True)
        write_complete_marker(sys.argv[1])
        print("done", flush=True)
    """)
    outcomes = {"no marker": 0, "complete": 0}
    for trial, delay in enumerate([0.0, 0.05, 0.15, 0.3, 0.6, 5.0]):
        ckpt = tmp_path / f"checkpoint-{trial + 1}"
        ckpt.mkdir()
        for i in range(6):
            (ckpt / f"shard-{i}.bin").write_bytes(os.urandom(8 << 20))
        proc = subprocess.Popen([sys.executable, "-c", script, str(ckpt)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        if delay < 5:
            time.sleep(delay)
            proc.kill()
        proc.wait(timeout=60)
        ok, reason = is_complete_checkpoint(ckpt)
        if (ckpt / MARKER_NAME).exists():
            assert ok, reason
            outcomes["complete"] += 1
        else:
            assert "no COMPLETE marker" in reason
            outcomes["no marker"] += 1
    assert outcomes["complete"] >= 1 and outcomes["no marker"] >= 1, outcomes


# ------------------------------------------------------------------------------------- finding and choosing


def test_find_latest_skips_and_logs_each_bad_folder(tmp_path):
    run = tmp_path / "run"
    for step in (2, 9, 10):
        make_checkpoint(run, step)
    make_checkpoint(run, 11, complete=False)
    bad = make_checkpoint(run, 12)
    (bad / "adapter_model.safetensors").write_bytes(b"")
    (run / "checkpoint-13").write_text("a file, not a folder")
    (run / "superseded-x").mkdir()
    logs = Logs()
    assert find_latest_complete_checkpoint(run, log=logs) == run / "checkpoint-10"  # numeric, not text, order
    assert len(logs) == 2
    assert "checkpoint-12" in logs[0] and "adapter_model.safetensors" in logs[0]
    assert "checkpoint-11" in logs[1] and "no COMPLETE marker" in logs[1]
    assert find_latest_complete_checkpoint(tmp_path / "nothing", log=logs) is None


def test_resolve_resume_auto_never_path(tmp_path):
    run = tmp_path / "run"
    logs = Logs()
    assert resolve_resume("auto", run, log=logs) is None
    assert "starting fresh" in logs[-1]

    good = make_checkpoint(run, 4)
    partial = make_checkpoint(run, 6, complete=False)
    assert resolve_resume("auto", run, log=logs) == good
    assert any("checkpoint-6" in m for m in logs)
    assert resolve_resume("never", run, log=logs) is None
    assert resolve_resume(str(good), run, log=logs) == good

    with pytest.raises(CheckpointError) as err:
        resolve_resume(str(partial), run, log=logs)
    msg = str(err.value)
    assert str(partial) in msg and "no COMPLETE marker" in msg and "--resume auto" in msg and str(good) in msg

    with pytest.raises(CheckpointError) as err:
        resolve_resume(str(run / "checkpoint-99"), run, log=logs)
    assert "checkpoint-99 does not exist" in str(err.value)

    with pytest.raises(CheckpointError) as err:
        resolve_resume(str(run), run, log=logs)
    assert "run folder" in str(err.value)


def test_where_a_run_starts_is_decided_once(tmp_path):
    """training/resume.py: Fresh, Train, SaveOnly (finished checkpoint, no final save) and AlreadyDone (the summary
    says finished at that step and the adapter is there); FSDP trains on from a finished checkpoint."""
    from training.resume import AlreadyDone, Fresh, SaveOnly, Train, decide_start

    run = tmp_path / "run"
    cfg = {"model_name_or_path": "m", "lora_r": 8, "target_modules": "all-linear", "max_steps": 10}
    logs = Logs()
    assert decide_start("auto", run, cfg, 10, False, logs) == Fresh()
    make_checkpoint(run, 4, run_config=cfg)
    start = decide_start("auto", run, {**cfg, "max_steps": 12}, 12, False, logs)
    assert isinstance(start, Train) and (start.step, start.checkpoint) == (4, run / "checkpoint-4")
    assert any("max_steps" in c for c in start.changes)  # a logged difference, not a refusal
    assert isinstance(decide_start("never", run, cfg, 10, False, logs), Fresh)
    assert isinstance(decide_start("auto", run, {**cfg, "max_steps": 4}, 4, False, logs), SaveOnly)
    assert isinstance(decide_start("auto", run, {**cfg, "max_steps": 4}, 4, True, logs), Train)  # FSDP: shards
    (run / "run_summary.json").write_text(json.dumps({"status": "finished", "steps": 4}))
    assert isinstance(decide_start("auto", run, cfg, 4, False, logs), SaveOnly)  # no adapter yet: not done
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    done = decide_start("auto", run, cfg, 4, False, logs)
    assert isinstance(done, AlreadyDone) and done.step == 4
    with pytest.raises(CheckpointError, match="does not exist"):
        decide_start(str(run / "checkpoint-9"), run, cfg, 10, False, logs)


def test_resume_compatibility(tmp_path):
    cfg = {"model_name_or_path": "models/tiny-gemma2", "lora_r": 8, "target_modules": ["q_proj", "v_proj"],
           "max_steps": 20, "learning_rate": 2e-4}
    ckpt = make_checkpoint(tmp_path, 10, run_config=cfg)
    logs = Logs()
    assert check_resume_compatible(ckpt, dict(cfg, target_modules=["v_proj", "q_proj"]), log=logs) == []
    changes = check_resume_compatible(ckpt, dict(cfg, max_steps=40), log=logs)
    assert changes == ["max_steps: 20 -> 40"] and "max_steps" in logs.text()
    for key, value in [("lora_r", 16), ("model_name_or_path", "google/gemma-2-2b"), ("target_modules", "all-linear")]:
        with pytest.raises(CheckpointError) as err:
            check_resume_compatible(ckpt, dict(cfg, **{key: value}), log=logs)
        assert key in str(err.value) and str(ckpt) in str(err.value)
    # another optimizer: refused where its saved state is another kind (the Trainer would fail on it at the first step)
    with_optim = make_checkpoint(tmp_path, 12, run_config=dict(cfg, optim="adamw_8bit"))
    assert check_resume_compatible(with_optim, dict(cfg, optim="paged_adamw_8bit"), log=logs) == [
        "optim: 'adamw_8bit' -> 'paged_adamw_8bit'"]
    with pytest.raises(CheckpointError, match="optim: checkpoint 'adamw_8bit', now 'adamw_torch_fused' .*bitsandbytes"):
        check_resume_compatible(with_optim, dict(cfg, optim="adamw_torch_fused"), log=logs)

    # Without run_config.json, PEFT's adapter_config.json is the record.
    peft_only = make_checkpoint(tmp_path, 11)
    (peft_only / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "models/tiny-gemma2", "r": 8, "target_modules": ["v_proj", "q_proj"]}))
    assert check_resume_compatible(peft_only, cfg, log=logs) == []
    with pytest.raises(CheckpointError):
        check_resume_compatible(peft_only, dict(cfg, lora_r=4), log=logs)


# ------------------------------------------------------------------------------------- deleting safely


def test_prune_keeps_newest_complete(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        make_checkpoint(run, step)
    make_checkpoint(run, 3, complete=False) if False else None
    stale = make_checkpoint(run, 0, complete=False)
    newer_partial = make_checkpoint(run, 5, complete=False)
    removed = prune_checkpoints(run, keep=2, log=Logs())
    assert sorted(p.name for p in removed) == ["checkpoint-0", "checkpoint-1", "checkpoint-2"]
    assert [p.name for _, p in list_checkpoints(run)] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert newer_partial.exists() and not stale.exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".trash")]


def test_set_aside_later_checkpoints(tmp_path):
    run = tmp_path / "run"
    for step in (5, 10, 15):
        make_checkpoint(run, step)
    make_checkpoint(run, 20, complete=False)
    logs = Logs()
    moved = set_aside_later_checkpoints(run, 5, log=logs)
    assert [p.name for p in moved] == ["checkpoint-10", "checkpoint-15"]
    assert all(is_complete_checkpoint(p)[0] for p in moved)  # moved whole, never deleted
    assert [p.name for _, p in list_checkpoints(run)] == ["checkpoint-5"]
    assert "checkpoint-20" in logs.text() and "deleted incomplete" in logs.text()


def test_remove_tree_atomically(tmp_path):
    ckpt = make_checkpoint(tmp_path, 3)
    remove_tree_atomically(ckpt)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- the callback in a real HF Trainer

def train_tiny(out: Path, metrics: Path, mode: str, max_steps: int = 8, save_steps: int = 100,
               sig: int = signal.SIGTERM, workers: int = 0):
    """A tiny real HF Trainer run (linear model, real optimizer/scheduler/RNG state) with CheckpointCallback.

    `mode` makes a helper callback deliver a real SIGTERM to this process at a chosen moment: "mid-step" (while
    step 3 runs), "eval" (during the evaluation at step 3), "save" (after HF wrote checkpoint-4, before our marker),
    "twice" (two signals while step 4 runs), "none". Returns (trainer, checkpoint_callback).
    """
    import torch
    from torch import nn
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from training.checkpoint_callback import CheckpointCallback

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 1)

        def forward(self, x, y):
            return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = torch.randn(8, generator=torch.Generator().manual_seed(i))
            return {"x": x, "y": x.sum()}

    class SendSignal(TrainerCallback):
        sent = False

        def _send(self, n=1):
            self.sent = True
            for _ in range(n):
                os.kill(os.getpid(), sig)

        def on_step_begin(self, args, state, control, **kw):
            if mode == "mid-step" and state.global_step == 2 and not self.sent:
                self._send()
            if mode == "twice" and state.global_step == 3 and not self.sent:
                self._send(2)
            if mode == "last-step" and state.global_step == max_steps - 1 and not self.sent:
                self._send()
            if mode == "ctrl-c" and state.global_step == 2 and not self.sent:
                self.sent = True  # what a terminal does on Ctrl+C: SIGINT to the whole foreground process group
                os.killpg(os.getpgrp(), signal.SIGINT)

        def on_prediction_step(self, args, state, control, **kw):
            if mode == "eval" and state.global_step == 3 and not self.sent:
                self._send()

        def on_save(self, args, state, control, **kw):
            # runs before CheckpointCallback.on_save: lands after HF wrote the files, before the marker
            if mode == "save" and state.global_step == 4 and not self.sent:
                self._send()

    cb = CheckpointCallback(run_name="t", metrics_path=metrics, keep=2,
                            run_config={"model_name_or_path": "tiny", "lora_r": 0, "target_modules": []})
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=save_steps, save_strategy="steps",
                             save_total_limit=None, per_device_train_batch_size=4, per_device_eval_batch_size=16,
                             eval_strategy="steps" if mode == "eval" else "no", eval_steps=3, logging_steps=1,
                             report_to="none", use_cpu=True, learning_rate=0.05, seed=1,
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=workers)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=Data(), eval_dataset=Data(),
                      callbacks=[SendSignal(), cb])
    try:
        trainer.train()
    finally:
        cb.restore_signal_handlers()
    return trainer, cb


def test_callback_marks_every_save_keeps_newest_and_records_events(tmp_path):
    out, metrics = tmp_path / "out", tmp_path / "metrics.jsonl"
    trainer, cb = train_tiny(out, metrics, "none", max_steps=6, save_steps=2)
    assert cb.exit_status is None and trainer.state.global_step == 6
    # saves at 2, 4, 6; keep=2 -> 4 and 6 remain, both complete with run_config.json in the manifest
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    for _, ckpt in list_checkpoints(out):
        assert is_complete_checkpoint(ckpt) == (True, "complete")
        files = read_manifest(ckpt)["files"]
        assert {"run_config.json", "trainer_state.json", "optimizer.pt", "rng_state.pth"} <= set(files)
    events = read_records(metrics)
    ckpt_events = [e for e in events if e.get("event") == "checkpoint"]
    assert [e["step"] for e in ckpt_events] == [2, 4, 6]
    assert all(e["run"] == "t" and e["path"].endswith(f"checkpoint-{e['step']}") and e["ts"] for e in ckpt_events)
    assert not [e for e in events if e.get("event") == "stopped"]


@pytest.mark.parametrize("mode, stop_step, sig", [("mid-step", 3, signal.SIGTERM), ("eval", 3, signal.SIGTERM),
                                                  ("save", 4, signal.SIGTERM), ("mid-step", 3, signal.SIGINT)])
def test_first_signal_saves_a_complete_checkpoint_at_the_current_step(tmp_path, mode, stop_step, sig):
    """SIGTERM while step 3 runs -> that step finishes, checkpoint-3; during eval at step 3 -> checkpoint-3;
    during HF's save of step 4 -> checkpoint-4 completes and training stops there. Exit status 128+signum
    (143 SIGTERM, 130 SIGINT / Ctrl+C)."""
    out, metrics = tmp_path / "out", tmp_path / "metrics.jsonl"
    trainer, cb = train_tiny(out, metrics, mode, max_steps=8, save_steps=4 if mode == "save" else 100, sig=sig)
    assert cb.exit_status == 128 + sig and trainer.state.global_step == stop_step
    ckpt = out / f"checkpoint-{stop_step}"
    assert is_complete_checkpoint(ckpt) == (True, "complete")
    assert find_latest_complete_checkpoint(out) == ckpt
    stopped = [e for e in read_records(metrics) if e.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == signal.Signals(sig).name and stopped[0]["step"] == stop_step
    assert stopped[0]["checkpoint"] == str(ckpt)
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stop_step


def test_second_signal_exits_at_once_without_a_checkpoint(tmp_path):
    out, metrics = tmp_path / "out", tmp_path / "metrics.jsonl"
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import test_checkpoints as t; "
            f"t.train_tiny(Path({str(out)!r}), Path({str(metrics)!r}), 'twice', max_steps=8, save_steps=2); "
            "print('RETURNED')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "second SIGTERM" in proc.stderr and "RETURNED" not in proc.stdout
    # checkpoint-2 is the newest and intact; nothing was saved for steps 3+
    assert find_latest_complete_checkpoint(out) == out / "checkpoint-2"
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not [e for e in read_records(metrics) if e.get("event") == "stopped"]


def test_signal_during_the_last_step_lets_the_run_finish(tmp_path):
    """Nothing is left to resume: the run ends normally (exit status None -> the recipe saves and exits 0)."""
    out, metrics = tmp_path / "out", tmp_path / "metrics.jsonl"
    trainer, cb = train_tiny(out, metrics, "last-step", max_steps=5, save_steps=100)
    assert cb.stop_requested and cb.exit_status is None and trainer.state.global_step == 5
    assert is_complete_checkpoint(out / "checkpoint-5") == (True, "complete")
    assert not [e for e in read_records(metrics) if e.get("event") == "stopped"]


def test_ctrl_c_with_dataloader_workers_still_saves(tmp_path):
    """Ctrl+C in a terminal reaches the DataLoader worker processes too (same process group); they must not die
    (a dead worker crashes the step) but leave the decision to the main process: complete checkpoint, exit 130."""
    out, metrics = tmp_path / "out", tmp_path / "metrics.jsonl"
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import test_checkpoints as t; "
            f"tr, cb = t.train_tiny(Path({str(out)!r}), Path({str(metrics)!r}), 'ctrl-c', max_steps=8, workers=2); "
            "sys.exit(cb.exit_status or 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)  # own process group
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert is_complete_checkpoint(out / "checkpoint-3") == (True, "complete")
    assert proc.stderr.count("SIGINT received") == 1  # the main process only, not each worker
