"""Several processes through the Makefile's launch path (`make train-native GPUS=2`), on the CPU over gloo.

The command lines are the ones `make -n` prints, run as they are: `.venv/bin/python -m training.qlora_finetune`
for GPUS=1 and `env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110 .venv/bin/accelerate launch --num_processes 2 --multi_gpu
... -m training.qlora_finetune` for GPUS=2
(without CUDA, `--multi_gpu` still starts two processes and the recipe trains on the CPU over gloo).

Three real runs of the tiny preset, 12 optimizer steps of 8 sequences each:
- one process, micro-batch 4 x accumulation 2;
- two processes (micro-batch 8 x 1 becomes micro-batch 4 x accumulation 1 x 2 ranks), SIGTERM to the launcher
  while step 6 is about to run;
- the same two-process command again (--resume auto), to step 12.
Tolerance of the loss-curve comparison: 1e-4 relative per step. Both set-ups see the same 8 sequences per step in
the same micro-batches of 4; the only arithmetic difference is how the two halves of the gradient are summed
(gloo all-reduce vs. accumulation), a few float32 ulps. Measured here: identical to the last bit. A wrong global
batch, duplicated or missing samples, or a resume that drops the optimizer/RNG state moves the loss by 1e-3 or more
within a few steps at this learning rate (3e-3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import optimizer_moment_layout
from training.checkpoints import read_manifest, verify_checkpoint
from training.runfiles import read_records

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
STEPS = 12
# Unpacked rows: the 12 steps stay inside the first epoch (packed, the sample data is one epoch every ~7 steps, and
# one process and two shuffle later epochs differently: HF's RandomSampler vs the distributed sampler).
# LoRA rank 64: tensors of 4,096 elements and more, which the 8-bit AdamW updates in one flat buffer (training.optim).
COMMON = (f"--max-steps {STEPS} --set logging_steps=1 --set save_steps=4 --set eval_steps=1000 --set packing=false "
          "--set lora_r=64")


def make_command(gpus: int, run: str, root: Path, extra: str = "") -> str:
    """The training command `make train-native` would run (`make -n`), for this run's folders."""
    args = f"--output-dir {root / 'outputs' / run} --logs-dir {root / 'logs'} {COMMON} {extra}"
    out = subprocess.run(["make", "-s", "-n", "train-native", f"GPUS={gpus}", "PRESET=tiny", f"RUN={run}",
                          f"ARGS={args}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "training.qlora_finetune" in line]
    assert len(lines) == 1, out.stdout
    return lines[0].strip()


def start(command: str, root: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TINY_MODEL_DIR": os.environ.get("TINY_MODEL_DIR", ""),
                **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v != ""}
    log_path = root / f"launcher-{time.time_ns()}.log"
    with open(log_path, "w") as log:
        # exec: the launcher itself is the process the test signals, as `docker stop` / Ctrl-C would reach it.
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=REPO, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path
    return proc


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    """Exit status and output; a run still alive after `timeout` is killed (with its ranks) and fails the test."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -9
    return rc, proc.log_path.read_text()


def losses(metrics: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in read_records(metrics):
        if "loss" in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("multi")
    env = {"TINY_MODEL_DIR": str(tiny_model_dir)}
    one_cmd = make_command(1, "one", root, "--resume never --set per_device_train_batch_size=4 "
                                          "--set gradient_accumulation_steps=2")
    two_cmd = make_command(2, "two", root, "--set per_device_train_batch_size=8")  # 8 x 1, split over 2 ranks
    one = start(one_cmd, root, env)
    # Two processes, paused before step 6 (test pause, tests/run_paused.py) so that the signal lands mid-run at a
    # known point: the same launch, with the recipe's CLI run through the runner script.
    paused_cmd = two_cmd.replace("-m training.qlora_finetune", "tests/run_paused.py step@6:120")
    assert paused_cmd != two_cmd, two_cmd
    two = start(paused_cmd, root, env)
    flag = root / "outputs" / "two" / ".test-paused-step-6"
    deadline = time.time() + 400
    while not flag.exists() and two.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    paused = flag.exists()
    two.send_signal(signal.SIGTERM)  # to the launcher only: accelerate/torchrun forwards it to every rank
    stop_rc, stop_log = finish(two)
    one_rc, one_log = finish(one)
    resume_rc, resume_log = finish(start(two_cmd, root, env))
    return {"root": root, "one_cmd": one_cmd, "two_cmd": two_cmd, "paused": paused,
            "one": (one_rc, one_log), "stop": (stop_rc, stop_log), "resume": (resume_rc, resume_log)}


def test_make_builds_the_accelerate_command(runs):
    assert runs["one_cmd"].startswith(".venv/bin/python -m training.qlora_finetune")
    assert runs["two_cmd"].startswith("env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110 .venv/bin/accelerate launch "
                                      "--num_processes 2 --multi_gpu ")
    assert " -m training.qlora_finetune --model-config tiny" in runs["two_cmd"]


def test_sigterm_to_the_launcher_leaves_one_complete_checkpoint(runs):
    rc, log = runs["stop"]
    assert runs["paused"], log[-3000:]
    assert rc != 0, log[-3000:]  # stopped, not finished
    out = runs["root"] / "outputs" / "two"
    ckpt = out / "checkpoint-6"  # both ranks agreed to stop after step 6 and saved it together
    manifest = read_manifest(ckpt)
    assert manifest is not None and manifest["step"] == 6
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= set(
        manifest["files"]), sorted(manifest["files"])
    assert verify_checkpoint(ckpt) == []
    storages, eight_bit, thirty_two_bit = optimizer_moment_layout(ckpt / "optimizer.pt")
    assert storages == 1 and eight_bit > thirty_two_bit > 0  # the flat buffer, saved by rank 0, resumed by both
    events = [r for r in read_records(runs["root"] / "logs" / "two" / "metrics.jsonl") if "event" in r]
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] == 6 and stopped[0]["signal"] == "SIGTERM"
    assert stopped[0]["checkpoint"].endswith("checkpoint-6")


def test_resume_with_two_processes_finishes(runs):
    rc, log = runs["resume"]
    assert rc == 0, log[-4000:]
    events = [r for r in read_records(runs["root"] / "logs" / "two" / "metrics.jsonl") if "event" in r]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["path"].endswith("checkpoint-6")
    assert [e["event"] for e in events if e["event"] in ("start", "finished")] == ["start", "start", "finished"]
    start_event = [e for e in events if e["event"] == "start"][-1]
    assert start_event["processes"] == 2 and start_event["global_batch"] == 8


def test_loss_curve_matches_one_process_with_the_same_global_batch(runs):
    rc, log = runs["one"]
    assert rc == 0, log[-4000:]
    one = losses(runs["root"] / "logs" / "one" / "metrics.jsonl")
    two = losses(runs["root"] / "logs" / "two" / "metrics.jsonl")
    assert sorted(one) == list(range(1, STEPS + 1))
    # Each step logged once: the stopped run logged 1-6, the resumed one 7-12; no rank logged twice.
    assert sorted(two) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in two.values()), two
    for step in range(1, STEPS + 1):
        a, b = one[step][0], two[step][0]
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: one process {a}, two processes {b}"
    assert one[STEPS][0] < one[1][0] - 0.1  # it did learn (the comparison is not between two flat lines)


def test_only_rank_0_writes_and_the_adapter_format_is_the_same(runs):
    root = runs["root"]
    one_out, two_out = root / "outputs" / "one", root / "outputs" / "two"
    assert sorted(p.name for p in (two_out / "adapter").iterdir()) == sorted(
        p.name for p in (one_out / "adapter").iterdir())
    cfg_one = json.loads((one_out / "adapter" / "adapter_config.json").read_text())
    cfg_two = json.loads((two_out / "adapter" / "adapter_config.json").read_text())
    def comparable(cfg: dict) -> dict:  # PEFT writes target_modules from a set: any order
        return {k: sorted(v) if isinstance(v, list) else v for k, v in cfg.items() if k != "base_model_name_or_path"}

    assert comparable(cfg_two) == comparable(cfg_one)
    from safetensors import safe_open

    with safe_open(str(one_out / "adapter" / "adapter_model.safetensors"), "pt") as f1, \
            safe_open(str(two_out / "adapter" / "adapter_model.safetensors"), "pt") as f2:
        assert sorted(f1.keys()) == sorted(f2.keys())
        assert all(f1.get_tensor(k).shape == f2.get_tensor(k).shape for k in f1.keys())
    summary = json.loads((two_out / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == STEPS
    assert summary["processes"] == 2 and summary["global_batch"] == 8
    assert summary["config"]["per_device_train_batch_size"] == 4
    assert summary["config"]["gradient_accumulation_steps"] == 1
    # One writer: the logs folder holds rank 0's two files only, one TensorBoard event file per launch.
    assert sorted(p.name for p in (root / "logs" / "two").iterdir()) == ["metrics.jsonl", "train.log"]
    assert len(list((two_out / "runs").rglob("events.out.tfevents.*"))) == 2  # the stopped and the resumed launch
    train_log = (root / "logs" / "two" / "train.log").read_text()
    assert "[rank 1]" not in train_log
    assert "micro-batch 4 x accumulation 1 x 2 processes" in train_log
    records = read_records(root / "logs" / "two" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [4, 6, 8, 12]
