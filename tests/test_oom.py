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
from training.runfiles import read_records



def start(tmp_path, name: str, limit: int, step: int, *sets: str):
    cmd = [sys.executable, "tests/inject_oom.py", str(limit), str(step), "--model-config", "tiny", "--run-name",
           name, "--output-dir", str(tmp_path / name), "--logs-dir", str(tmp_path / "logs"), "--max-steps", "4",
           "--set", "save_steps=2", "--set", "logging_steps=1", "--set", "per_device_train_batch_size=8"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def events(tmp_path, name: str, event: str) -> list[dict]:
    return [r for r in read_records(tmp_path / "logs" / name / "metrics.jsonl") if r.get("event") == event]


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_model_dir")
def test_oom_exits_2_with_the_plan_and_knobs_and_oom_retry_halves_the_micro_batch(tmp_path):
    procs = {
        "first": start(tmp_path, "first", 4, 1),  # micro-batch 8 "does not fit"
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


def test_planned_oom_names_the_planner_knobs_and_the_processes_on_the_card(tmp_path):
    """The message on a CUDA card, with the planner on; the card report from NVML's process list (the test's NVML
    stand-in, tests/fake_nvml.py: there is no driver here)."""
    import torch

    from tests.fake_nvml import MIB, FakeGpu, FakeNvml
    from training.device import Device
    from training.oom import PlanUsed, card_report, oom_message

    nvml = FakeNvml([FakeGpu(name="NVIDIA GeForce RTX 4090", mem_used_mib=23_000, mem_total_mib=24_564,
                             processes=[(os.getpid(), 14_000 * MIB), (99_999_999, 9_000 * MIB)])])
    card = card_report(nvml=nvml)
    assert card.startswith(f"NVIDIA GeForce RTX 4090: 22.5 of 24.0 GiB in use; processes on it: pid {os.getpid()} "
                           "(this run) python"), card
    assert card.endswith(" 14,000 MiB, pid 99999999 ? 9,000 MiB"), card  # another container's process: no name
    assert nvml.shutdown_calls == 1
    device = Device("cuda", "NVIDIA GeForce RTX 4090", 24.0, torch.bfloat16, True, False)
    plan = PlanUsed(8, 2, False, 2048, True, "planner (24 GiB card, hf+liger): micro-batch 8 x accumulation 2, "
                    "predicted peak 19.8 GiB", device)
    err = oom_message(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.95 GiB"), plan, 0,
                      tmp_path, retried=False, card=card)
    text = str(err)
    assert text.startswith("CUDA out of memory at step 1 (CUDA out of memory. Tried to allocate 1.95 GiB)")
    assert "micro-batch 8 x accumulation 2 of up to 2048 tokens, gradient checkpointing off" in text
    assert "predicted peak 19.8 GiB" in text and "pid 99999999" in text
    assert "--set max_micro_batch=4 (same tokens per step" in text and "--set gpu_mem_gib=N" in text
    assert "below the card's 24 GiB" in text and "--set max_seq_length=1024" in text and "oom_retry=true" in text
    assert err.retry == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "max_micro_batch": 4}
    assert err.reason == "out_of_memory"
    again = oom_message(RuntimeError("CUDA out of memory."), PlanUsed(1, 16, True, 2048, True, "planner", device),
                        None, tmp_path, retried=True, card=card)
    assert "while loading the model after oom_retry" in str(again) and again.retry is None
    assert "max_micro_batch" not in str(again)  # micro-batch 1 cannot be halved
