"""CUDA out of memory: a message with the plan that was used, what else holds the card, and the knob to turn.

`oom_guard` wraps model loading and training: torch.cuda.OutOfMemoryError becomes OutOfMemory (a ResourceError:
exit 2, a `failed` event with reason `out_of_memory`) after removing any checkpoint folder the failed step left
without its COMPLETE marker. With `--set oom_retry=true`, `train_with_oom_retry` halves the micro-batch, doubles
gradient accumulation (the tokens per optimizer step stay), records an `oom_retry` event and runs once more.
"""

from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from training.device import ResourceError

log = logging.getLogger("training")
MIB = 2**20


class OutOfMemory(ResourceError):
    """The step did not fit the GPU; `retry` holds the config overrides that halve the micro-batch (or None)."""

    reason = "out_of_memory"

    def __init__(self, message: str, retry: dict[str, int] | None):
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class PlanUsed:
    """What the failed attempt ran with (one GPU's view, before any split over several processes)."""

    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    max_seq_length: int
    planner: bool  # whether the VRAM planner chose micro-batch and checkpointing
    plan_line: str
    device: Any  # training.device.Device


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def card_report(device_index: int = 0, nvml: Any = None) -> str:
    """The card's memory and the processes NVML sees on it (this run marked). `nvml`: the pynvml module (a test's
    stand-in without a driver)."""
    try:
        import torch

        from training.gpu_monitor import NvmlSampler

        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        try:
            uuid = str(torch.cuda.get_device_properties(device_index).uuid) if torch.cuda.is_available() else None
            sampler = NvmlSampler(nvml)
            samples = [sampler.sample_device(i) for i in range(nvml.nvmlDeviceGetCount())]
        finally:
            nvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - no driver, no NVML library, no permission: say so, never fail here
        return f"NVML cannot list the card's processes here ({type(exc).__name__})"
    sample = next((s for s in samples if uuid and s["uuid"] and uuid in s["uuid"]), samples[0] if samples else None)
    if sample is None:
        return "NVML sees no GPU"
    procs = sample["processes"] or []
    listed = ", ".join(f"pid {p['pid']}{' (this run)' if p['pid'] == os.getpid() else ''} {p['name'] or '?'} "
                       f"{p['used_mib'] or 0:,.0f} MiB" for p in procs) or "none listed"
    used, total = sample["mem_used_mib"] or 0, sample["mem_total_mib"] or 0
    return f"{sample['name']}: {used / 1024:.1f} of {total / 1024:.1f} GiB in use; processes on it: {listed}"


def oom_message(exc: BaseException, plan: PlanUsed, step: int | None, run_dir: Path, retried: bool,
                card: str | None = None) -> OutOfMemory:
    """The OutOfMemory to raise; `card` defaults to card_report() of the first GPU."""
    from training.checkpoints import find_latest_complete_checkpoint

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    m, a, seq = plan.micro_batch, plan.accumulation, plan.max_seq_length
    where = f"at step {step + 1}" if step is not None else "while loading the model"
    latest = find_latest_complete_checkpoint(run_dir, log=lambda _msg: None, level="sizes")
    half = m // 2
    knobs = []
    if plan.planner:
        if half:
            knobs.append(f"--set max_micro_batch={half} (same tokens per step, more accumulation)")
        knobs.append(f"--set gpu_mem_gib=N with N below the card's {plan.device.memory_gib or 0:.0f} GiB (plan for "
                     "what is free when other processes share it)")
    else:
        if half:
            knobs.append(f"--set per_device_train_batch_size={half} --set gradient_accumulation_steps={2 * a} "
                         "(same tokens per step)")
        if not plan.gradient_checkpointing:
            knobs.append("--set gradient_checkpointing=true")
    knobs.append(f"--set max_seq_length={max(seq // 2, 1)}")
    if half and not retried:
        knobs.append("--set oom_retry=true (halves the micro-batch and retries once by itself)")
    retry = ({"per_device_train_batch_size": half, "gradient_accumulation_steps": 2 * a, "max_micro_batch": half}
             if half and not retried else None)
    text = (f"CUDA out of memory {where}{' after oom_retry halved the micro-batch' if retried else ''} ({first}). "
            f"Plan used: micro-batch {m} x accumulation {a} of up to {seq} tokens, gradient checkpointing "
            f"{'on' if plan.gradient_checkpointing else 'off'}; {plan.plan_line}. Card now: {card or card_report()}. "
            f"Nothing was saved at this step; newest complete checkpoint: {latest or 'none'}. Turn a knob: "
            + "; ".join(knobs))
    return OutOfMemory(text, retry)


@contextmanager
def oom_guard(plan: Callable[[], PlanUsed], step: Callable[[], int | None], run_dir: Path,
              retried: bool) -> Iterator[None]:
    """Turn CUDA OOM into OutOfMemory, leaving no partial checkpoint behind."""
    try:
        yield
    except Exception as exc:
        if not is_cuda_oom(exc):
            raise
        from training.disk import remove_partial_saves

        removed = remove_partial_saves(run_dir, checkpoints=True)
        for path in removed:
            log.warning("removed %s: an incomplete save of the failed step", path)
        raise oom_message(exc, plan(), step(), run_dir, retried) from None


def free_cuda_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_with_oom_retry(train: Callable[..., int], cfg, **kwargs: Any) -> int:
    """train(cfg, **kwargs, retried=False); on OutOfMemory with cfg.oom_retry, once more with half the micro-batch
    (kwargs must hold `paths`, the run's RunPaths, for the event)."""
    from training.runfiles import log_event

    try:
        return train(cfg, retried=False, **kwargs)
    except OutOfMemory as exc:
        if not cfg.oom_retry or exc.retry is None:
            raise
        retry, message = exc.retry, str(exc)
    # Outside the except block: the traceback (and the failed attempt's model and optimizer) is gone by now.
    free_cuda_memory()
    log.warning("oom_retry: %s; retrying once with micro-batch %d x accumulation %d (same tokens per step)",
                message.split(" (")[0], retry["per_device_train_batch_size"], retry["gradient_accumulation_steps"])
    log_event(kwargs["paths"].metrics, kwargs["paths"].name, 0, "oom_retry", error=message, **retry)
    return train(replace(cfg, **retry), retried=True, **kwargs)
