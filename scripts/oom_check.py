"""A real CUDA out-of-memory through the recipe, then the same run with oom_retry (needs one CUDA GPU, no network).

The gemma-2b preset on a random-init Gemma-2-2B-shape model (scripts/benchmark.py's, no download), planner off,
gradient checkpointing off, eager attention, plain transformers + peft (logits materialised), sequences of SEQ
tokens: micro-batch 2 needs about 1.2x an H200's 139 GiB (training/plan.py's estimate: 170 GiB), micro-batch 1 about 0.6x.
  1. micro-batch 2, no retry: must exit 2 with the OOM message (plan used, NVML processes, knobs), leave no
     checkpoint folder and record a `failed` event with reason out_of_memory;
  2. the same with --set oom_retry=true: must log the retry, finish with micro-batch 1 x accumulation 2, and every
     checkpoint folder must be complete.
Prints each run's exit status and message, and PASS/FAIL lines; exit status 0 when everything held.

    PYTHONPATH=$PWD/site:$PWD python3 scripts/oom_check.py [--root /tmp/oom_check] [--seq 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def long_data(path: Path) -> Path:
    words = [w for w in (REPO / "datasets/sample/chat.jsonl").read_text().split() if w.isalpha()] or ["token"]
    rng = random.Random(0)
    with open(path, "w") as fh:  # every record longer than the sequence length: each row is full
        for _ in range(64):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(6000))}) + "\n")
    return path


def run(root: Path, name: str, model: Path, data: Path, seq: int, *extra: str) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "training.qlora_finetune", "--model-config", "gemma-2b", "--model", str(model),
           "--data", str(data), "--run-name", name, "--output-dir", str(root / "outputs" / name),
           "--logs-dir", str(root / "logs"), "--max-steps", "2", "--resume", "never",
           "--set", "plan_memory=false", "--set", "backend=hf", "--set", "gradient_checkpointing=false",
           "--set", "attn_implementation=eager", "--set", "fp32_norms_and_embeddings=true",  # the estimate below
           "--set", "per_device_train_batch_size=2", "--set", "gradient_accumulation_steps=1",
           "--set", f"max_seq_length={seq}", "--set", "eval_fraction=0", "--set", "save_steps=1",
           "--set", "logging_steps=1", "--set", "report_to=none", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def events(root: Path, name: str, event: str) -> list[dict]:
    from training.runfiles import read_records

    return [r for r in read_records(root / "logs" / name / "metrics.jsonl") if r.get("event") == event]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/oom_check", help="work folder (model, data, runs)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default: %(default)s)")
    args = p.parse_args(argv)
    import torch

    from benchmark import model_dir
    from training.checkpoints import list_checkpoints, verify_checkpoint
    from training.plan import KNOWN_ARCHS, estimate_peak

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_properties(0).total_memory / 2**30
    arch = KNOWN_ARCHS["google/gemma-2-2b"]
    for mb in (2, 1):
        est = estimate_peak(arch, mb, args.seq, 32, "hf", gradient_checkpointing=False, fused_loss=False)
        print(f"estimate: micro-batch {mb} x {args.seq} tokens, no checkpointing: {est.peak_gib:.0f} GiB "
              f"of a {card:.0f} GiB card ({est.peak_gib / card:.2f}x)")
    t0 = time.time()
    model, data = model_dir("2b", root), long_data(root / "long.jsonl")
    print(f"model {model} and data ready in {time.time() - t0:.0f}s")
    ok = True

    def check(cond: bool, what: str) -> None:
        nonlocal ok
        ok &= bool(cond)
        print(f"{'PASS' if cond else 'FAIL'}: {what}")

    rc, out, secs = run(root, "oom", model, data, args.seq)
    message = next((line for line in out.splitlines() if "CUDA out of memory" in line), "(no OOM message)")
    print(f"\n== 1. micro-batch 2, no retry: exit {rc} in {secs:.0f}s\n{message}\n")
    check(rc == 2, "exit status 2")
    check("Traceback" not in out, "no traceback")
    check("Plan used: micro-batch 2 x accumulation 1" in message and "processes on it:" in message,
          "the message has the plan and the card's processes")
    check("--set per_device_train_batch_size=1" in message and "--set oom_retry=true" in message,
          "the message names the knobs")
    check(not list_checkpoints(root / "outputs" / "oom"), "no checkpoint folder left")
    failed = events(root, "oom", "failed")
    check(bool(failed) and failed[-1].get("reason") == "out_of_memory", "failed event with reason out_of_memory")

    rc, out, secs = run(root, "retry", model, data, args.seq, "--set", "oom_retry=true")
    retry_line = next((line for line in out.splitlines() if "oom_retry:" in line), "(no oom_retry line)")
    print(f"\n== 2. micro-batch 2 with oom_retry: exit {rc} in {secs:.0f}s\n{retry_line}")
    print("\n".join(out.splitlines()[-4:]) + "\n")
    check(rc == 0, "exit status 0 after the retry")
    check(len(events(root, "retry", "oom_retry")) == 1, "one oom_retry event")
    summary_path = root / "outputs" / "retry" / "run_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"config": {}}
    check((summary["config"].get("per_device_train_batch_size"), summary["config"].get("gradient_accumulation_steps"))
          == (1, 2), "finished with micro-batch 1 x accumulation 2 (same tokens per step)")
    ckpts = list_checkpoints(root / "outputs" / "retry")
    check(bool(ckpts) and all(verify_checkpoint(c) == [] for _, c in ckpts),
          f"every checkpoint folder complete ({', '.join(c.name for _, c in ckpts)})")
    print(f"\n{'ALL PASSED' if ok else 'SOME CHECKS FAILED'} in {time.time() - t0:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
