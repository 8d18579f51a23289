"""CUDA out of memory in the recipe, injected at a step through a TrainerCallback (tests/inject_oom.py; there is no
GPU here): exit 2 with the plan used and the knobs, no partial checkpoint, and `oom_retry` halving the micro-batch.
A real CUDA OOM on a GPU: scripts/oom_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from training.checkpoints import list_checkpoints, verify_checkpoint
from training.jsonl import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_model_dir")]


def start(tmp_path, name: str, limit: int, step: int, *sets: str):
    cmd = [sys.executable, "tests/inject_oom.py", str(limit), str(step), "--model-config", "tiny", "--run-name",
           name, "--output-dir", str(tmp_path / name), "--logs-dir", str(tmp_path / "logs"), "--max-steps", "4",
           "--set", "save_steps=2", "--set", "logging_steps=1"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def events(tmp_path, name: str, event: str) -> list[dict]:
    return [r for r in read_jsonl(tmp_path / "logs" / name / "metrics.jsonl") if r.get("event") == event]


def test_oom_exits_2_with_the_plan_and_knobs_and_oom_retry_halves_the_micro_batch(tmp_path):
    procs = {
        "first": start(tmp_path, "first", 4, 1),  # the tiny preset's micro-batch 8 "does not fit"
        "later": start(tmp_path, "later", 4, 3),  # after checkpoint-2
        "retry": start(tmp_path, "retry", 4, 1, "oom_retry=true"),  # micro-batch 4 fits
        "again": start(tmp_path, "again", 1, 1, "oom_retry=true"),  # 4 does not fit either
    }
    out = {k: (p.communicate(timeout=600)[0], p.returncode) for k, p in procs.items()}

    log, rc = out["first"]
    assert rc == 2 and "Traceback" not in log, log[-4000:]
    assert "CUDA out of memory at step 1 (CUDA out of memory. Tried to allocate 2.00 GiB" in log
    assert "Plan used: micro-batch 8 x accumulation 1 of up to 256 tokens, gradient checkpointing on" in log
    assert "planner off" in log and "NVML" in log and "newest complete checkpoint: none" in log
    assert "--set per_device_train_batch_size=4 --set gradient_accumulation_steps=2 (same tokens per step)" in log
    assert "--set max_seq_length=128" in log and "--set oom_retry=true" in log
    failed = events(tmp_path, "first", "failed")
    assert failed and failed[-1]["reason"] == "out_of_memory" and "OutOfMemory" in failed[-1]["error"]
    assert not list_checkpoints(tmp_path / "first") and not (tmp_path / "first" / "adapter").exists()

    log, rc = out["later"]
    assert rc == 2 and "CUDA out of memory at step 3" in log, log[-4000:]
    assert f"newest complete checkpoint: {tmp_path / 'later' / 'checkpoint-2'}" in log
    assert [p.name for _, p in list_checkpoints(tmp_path / "later")] == ["checkpoint-2"]
    assert verify_checkpoint(tmp_path / "later" / "checkpoint-2") == []

    log, rc = out["retry"]
    assert rc == 0, log[-4000:]
    assert "oom_retry: CUDA out of memory at step 1; retrying once with micro-batch 4 x accumulation 2" in log
    retry = events(tmp_path, "retry", "oom_retry")
    assert len(retry) == 1 and retry[0]["per_device_train_batch_size"] == 4
    assert retry[0]["gradient_accumulation_steps"] == 2
    summary = json.loads((tmp_path / "retry" / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["global_batch"] == 8  # tokens per optimizer step kept
    assert (summary["config"]["per_device_train_batch_size"], summary["config"]["gradient_accumulation_steps"]) \
        == (4, 2)

    log, rc = out["again"]
    assert rc == 2 and "Traceback" not in log, log[-4000:]
    assert "CUDA out of memory at step 1 after oom_retry halved the micro-batch" in log
    assert "micro-batch 4 x accumulation 2" in log and len(events(tmp_path, "again", "oom_retry")) == 1
