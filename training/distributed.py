"""Several processes (one per GPU) under `accelerate launch` / torchrun: who is rank 0, the global batch, agreement.

The launcher (accelerate launch, torchrun, or a scheduler that sets the same variables) starts one copy of the recipe
per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python -m training.qlora_finetune` has none of them and
is rank 0 of 1. Everything here reads those variables, so it works before torch.distributed is initialised and in
modules that must not import accelerate.

Rules (docs/multi_gpu.md):
- only rank 0 writes files (metrics JSONL, train.log, run_summary.json, the adapter, checkpoint markers);
- tokens per optimizer step stay the config's (micro-batch x accumulation, as one GPU would run it):
  N processes divide the accumulation, and lower the micro-batch when they must;
- a stop signal is acted on only once every rank agrees on it (`agree_max`), so that all save the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from training.errors import UserError


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0 of the whole job (of every host): the only process that writes files."""
    return rank() == 0


def fsdp_enabled() -> bool:
    """accelerate launch with an FSDP config (FSDP=1) sets ACCELERATE_USE_FSDP=true in every rank."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes", "on")


def initialised() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always has it on Linux
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_process_group(cpu: bool, timeout_s: int = 1800) -> None:
    """Join the other ranks now (before the model loads): transformers' FSDP low-memory loading and the per-rank
    device need it. accelerate's shared state is what the Trainer uses later, so this is the same process group.
    gloo on the CPU, NCCL on CUDA (accelerate's choice)."""
    if world_size() <= 1:
        return
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    if not cpu and torch.cuda.is_available():
        if local_rank() >= torch.cuda.device_count():
            raise DistributedError(
                f"rank {rank()} wants GPU {local_rank()} but only {torch.cuda.device_count()} are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): use GPUS <= "
                f"{torch.cuda.device_count()}, or make more cards visible (Docker: GPU_COUNT)")
        torch.cuda.set_device(local_rank())  # every rank on its own card, before anything allocates on cuda:0
    PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the process group at the end of a run (NCCL warns about leaked resources otherwise)."""
    if initialised():
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier() -> None:
    if initialised():
        import torch.distributed as dist

        dist.barrier()


def agree_max(value: int) -> int:
    """The largest `value` over all ranks (every rank must call it at the same point); `value` when alone."""
    if not initialised():
        return value
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class DistributedError(UserError, ValueError):
    """A several-process launch that cannot work as asked; the message says what to change."""


class GlobalBatchError(DistributedError):
    """The config's sequences per optimizer step cannot be split evenly over the processes."""


@dataclass(frozen=True)
class GlobalBatch:
    sequences: int  # per optimizer step, all processes together
    micro_batch: int  # per process
    accumulation: int
    processes: int

    def describe(self, asked_micro: int, asked_accum: int) -> str:
        return (f"global batch {self.sequences} sequences per optimizer step (config: micro-batch {asked_micro} x "
                f"accumulation {asked_accum} on one GPU) = micro-batch {self.micro_batch} x accumulation "
                f"{self.accumulation} x {self.processes} processes")


def split_global_batch(micro_batch: int, accumulation: int, processes: int) -> GlobalBatch:
    """Keep micro_batch x accumulation sequences per optimizer step over `processes` ranks.

    accumulation' = micro x accum / (micro' x processes), with micro' the largest micro-batch <= micro that divides
    the per-process share (a smaller micro-batch only lowers memory). Raises GlobalBatchError, naming the numbers
    and a fix, when the sequences cannot be shared evenly.
    """
    sequences = micro_batch * accumulation
    if processes <= 1:
        return GlobalBatch(sequences, micro_batch, accumulation, 1)
    if sequences % processes:
        nearest = max(processes, sequences - sequences % processes)
        raise GlobalBatchError(
            f"the global batch of {sequences} sequences per optimizer step (per_device_train_batch_size "
            f"{micro_batch} x gradient_accumulation_steps {accumulation}) cannot be split over {processes} "
            f"processes. Use a number of GPUs that divides {sequences}, or change the global batch, e.g. "
            f"--set per_device_train_batch_size={nearest // processes} --set gradient_accumulation_steps={processes} "
            f"({nearest} sequences)")
    share = sequences // processes
    micro = max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)
    return GlobalBatch(sequences, micro, share // micro, processes)
