"""Fast checks of the several-process plumbing: the global batch split, rank detection, and the launch lines the
Makefile builds (`make -n`, no training). The real two-process runs are in test_multi_process.py (slow)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from training.distributed import GlobalBatchError, is_main, rank, split_global_batch, world_size

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("micro, accum, procs, want", [
    (8, 1, 1, (8, 8, 1)),      # one process: unchanged
    (8, 1, 2, (8, 4, 1)),      # tiny on 2 ranks: micro-batch lowered to 4, 8 sequences per step kept
    (4, 4, 2, (16, 4, 2)),     # gemma-2b on 2 GPUs: accumulation halved
    (4, 4, 4, (16, 4, 1)),
    (4, 4, 8, (16, 2, 1)),     # 8 GPUs: 2 sequences each
    (2, 8, 3, None),           # 16 sequences cannot be shared by 3 ranks
    (3, 4, 4, (12, 3, 1)),
    (6, 2, 8, None),
])
def test_split_keeps_sequences_per_optimizer_step(micro, accum, procs, want):
    if want is None:
        with pytest.raises(GlobalBatchError) as exc:
            split_global_batch(micro, accum, procs)
        msg = str(exc.value)
        assert f"{micro * accum} sequences" in msg and f"{procs} processes" in msg and "--set" in msg
        return
    b = split_global_batch(micro, accum, procs)
    assert (b.sequences, b.micro_batch, b.accumulation) == want
    assert b.micro_batch * b.accumulation * b.processes == micro * accum
    assert b.micro_batch <= micro  # never more memory per GPU than the config asked for


def test_suggested_fix_is_itself_divisible():
    with pytest.raises(GlobalBatchError) as exc:
        split_global_batch(3, 3, 2)  # 9 sequences on 2 ranks
    msg = str(exc.value)
    micro = int(msg.split("per_device_train_batch_size=")[-1].split()[0])
    accum = int(msg.split("gradient_accumulation_steps=")[-1].split()[0])
    split_global_batch(micro, accum, 2)  # does not raise


def test_rank_from_the_launcher_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert (rank(), world_size(), is_main()) == (0, 1, True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (rank(), world_size(), is_main()) == (3, 4, False)


def make_n(*args: str) -> str:
    out = subprocess.run(["make", "-s", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_launch_lines():
    one = [l for l in make_n("train-native").splitlines() if "training.qlora_finetune" in l]
    assert one and one[0].startswith(".venv/bin/python -m training.qlora_finetune")
    docker = make_n("train-gemma-2b", "GPUS=2", "GPU=0")
    assert "LAUNCH='env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110 accelerate launch --num_processes 2 --multi_gpu " in docker
    assert make_n("train-gemma-2b", "GPU=0").count("LAUNCH='python -m'") == 1
    fsdp = make_n("train-gemma-9b", "GPUS=2", "FSDP=1", "GPU=0")
    assert "--config_file configs/accelerate/fsdp_qlora.yaml" in fsdp and "--multi_gpu" not in fsdp
    multi = make_n("train-gemma-9b", "GPUS=8", "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=10.0.0.1", "GPU=0")
    assert "--num_processes 16" in multi and "--num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1" in multi
    assert "-f docker-compose.multinode.yml" in multi


def test_make_refuses_a_bad_gpu_count():
    out = subprocess.run(["make", "-n", "train-native", "GPUS=two"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "GPUS and NNODES must be whole numbers" in out.stderr
    assert (REPO / "configs" / "accelerate" / "fsdp_qlora.yaml").is_file()
