"""The trainer side of never losing work: a marker after each save, retention, events, stop signal = save.

`CheckpointCallback` makes every checkpoint HF saves complete (training/checkpoints.py writes the manifest and the
COMPLETE marker), keeps the newest few, records `checkpoint` / `resumed` / `stopped` events, and turns a first
SIGTERM/SIGINT into "finish this optimizer step, save a complete checkpoint, stop".

Several ranks (`accelerate launch`, GPUS=N): the ranks agree on the stop at the end of an optimizer step (one
all-reduce per step), save that step together, and rank 0 writes the marker after a barrier, so the manifest covers
every rank's files (rng_state_R.pth, FSDP shards). A signal that lands during evaluation or a save is acted on at the
next step end (one step later than alone). After forwarding SIGTERM, torchrun SIGKILLs the ranks after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default; the Makefile's launch sets 110).
DataLoader workers must be forked (Linux default up to Python 3.13) to inherit the handler that keeps them alive on
Ctrl+C.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from transformers import TrainerCallback

from training import distributed
from training.checkpoints import (Log, checkpoint_step, prune_checkpoints, set_aside_later_checkpoints,
                                  write_complete_marker)
from training.jsonio import write_json_atomic
from training.runfiles import CHECKPOINT_PREFIX, CHECKPOINT_RUN_CONFIG, log_event

logger = logging.getLogger("training.checkpoints")


def keep_adapter_dtype_on_resume(model: Any) -> bool:
    """Make HF's resume load the adapter weights into the dtype the fresh trainer gave them.

    The Trainer resumes a PEFT model with `load_adapter()`, which by default upcasts bf16/fp16 adapter weights to
    fp32 (`autocast_adapter_dtype=True`), while TRL keeps QLoRA adapters in bf16: the resumed run would then train
    in another precision than an uninterrupted one (measured on the tiny preset: losses 2e-5 relative apart two
    steps after the resume point, adapter weights 5e-4 apart). Returns whether the model was adjusted.
    """
    import functools
    import inspect

    load = getattr(model, "load_adapter", None)
    if load is None:
        return False
    try:
        if "autocast_adapter_dtype" not in inspect.signature(load).parameters:
            return False
    except (TypeError, ValueError):
        return False
    model.load_adapter = functools.partial(load, autocast_adapter_dtype=False)
    return True


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


@dataclass(frozen=True)
class PauseAt:
    """Tests only: pause once at POINT (step | eval | save | final) of STEP for SECONDS, dropping
    `.test-paused-POINT-STEP` in the run folder, so that a test can deliver a signal or fill the disk right there.
    A stop signal ends the pause early. Given to CheckpointCallback(pause=...) by tests/run_paused.py."""

    point: str
    step: int
    seconds: float

    @classmethod
    def parse(cls, spec: str) -> "PauseAt":
        """"save@2:30" -> PauseAt("save", 2, 30.0)."""
        m = re.fullmatch(r"(step|eval|save|final)@(\d+):([0-9.]+)", spec.strip())
        if not m:
            raise ValueError(f"test pause {spec!r}: want POINT@STEP:SECONDS, POINT one of step, eval, save, final")
        return cls(m.group(1), int(m.group(2)), float(m.group(3)))


class CheckpointCallback(TrainerCallback):
    """Makes every HF checkpoint complete (marker + manifest + run_config.json + extra_json files), keeps the newest
    `keep`, records `checkpoint` / `resumed` / `stopped` events, and turns the first SIGTERM/SIGINT into "finish this optimizer
    step, save a full checkpoint, stop"; a second signal exits at once (the last complete checkpoint is untouched).

    Set `save_total_limit=None` in TrainingArguments: HF rotates before this callback marks the new checkpoint, so
    its rotation could delete the last complete one while the new one is not yet marked.
    After `trainer.train()` returns, `exit_status` is 128+signum when a signal stopped the run before max_steps
    (143 for SIGTERM, 130 for SIGINT), else None.
    """

    def __init__(
        self,
        *,
        run_name: str,
        metrics_path: str | os.PathLike | None = None,
        run_config: dict[str, Any] | None = None,
        keep: int | None = 3,
        resumed_from: str | os.PathLike | None = None,
        resume_changes: Iterable[str] = (),
        extra_json: dict[str, Any] | None = None,
        install_signal_handlers: bool = True,
        log: Log | None = None,
        pause: PauseAt | None = None,
    ):
        self.run_name = run_name
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.run_config = dict(run_config) if run_config else None
        self.keep = keep
        self.resumed_from = Path(resumed_from) if resumed_from else None
        self.resume_changes = list(resume_changes)
        self.extra_json = dict(extra_json or {})  # more JSON files each checkpoint records (name -> content)
        self.log = logger.warning if log is None else log
        self.stop_signal: int | None = None  # the signal this process received
        # Several ranks (accelerate launch): the signal every rank agreed to act on at the end of an optimizer step
        # (another rank's, when this one has not received it yet).
        self._agreed_signal: int | None = None
        self.stopped_early = False
        self.last_complete: Path | None = None
        self._stop_announced = False
        self._test_pause = pause  # tests only (PauseAt)
        self._previous_handlers: dict[int, Any] = {}
        self._owner_pid = os.getpid()
        if install_signal_handlers:
            self.install_signal_handlers()

    # -- signals -----------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        self._owner_pid = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs in the main thread between bytecodes; os.write, not print/logging (not reentrant-safe).
        if os.getpid() != self._owner_pid:
            # A forked DataLoader worker (it inherits this handler): Ctrl+C reaches the whole process group, and
            # the worker must keep serving batches while the main process finishes the step and saves.
            return
        if self.stop_signal is not None:
            os.write(2, f"\n[checkpoints] second {_signal_name(signum)}: exiting now without saving; the last "
                        f"complete checkpoint is untouched\n".encode())
            os._exit(128 + signum)
        self.stop_signal = signum
        os.write(2, f"\n[checkpoints] {_signal_name(signum)} received: finishing this step, then saving a complete "
                    f"checkpoint and stopping (send it again to exit at once)\n".encode())

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    @property
    def _signum(self) -> int | None:
        return self.stop_signal or self._agreed_signal

    @property
    def exit_status(self) -> int | None:
        """128+signum when a signal stopped training before max_steps, else None (a signal during the last step
        lets the run finish normally)."""
        return 128 + self._signum if self.stopped_early else None

    def _should_stop(self) -> bool:
        """Alone: act on a signal at the next hook. Several ranks: only once all of them agreed on it at the end of
        an optimizer step (`_agree_on_stop`), so that every rank saves the same step together; a rank that saved or
        stopped alone would wait forever for the others in the next collective."""
        if distributed.initialised():
            return self._agreed_signal is not None
        return self.stop_requested

    def _agree_on_stop(self) -> None:
        """Every rank calls this at every optimizer step end: one tiny all-reduce (max of the signal numbers)."""
        if distributed.initialised() and self._agreed_signal is None:
            agreed = distributed.agree_max(self.stop_signal or 0)
            self._agreed_signal = agreed or None

    def _request_save_and_stop(self, state: Any, control: Any, where: str) -> None:
        control.should_save = True
        control.should_training_stop = True
        if not self._stop_announced:
            self._stop_announced = True
            self.log(f"{_signal_name(self._signum)}: saving a complete checkpoint at step {state.global_step} "
                     f"({where}) and stopping")

    # -- events ------------------------------------------------------------------------------------------------
    def _event(self, state: Any, event: str, **fields: Any) -> None:
        if self.metrics_path is not None and state.is_world_process_zero:
            log_event(self.metrics_path, self.run_name, state.global_step, event, **fields)

    def _maybe_pause(self, point: str, step: int, run_dir: str) -> None:
        if self._test_pause is None:
            return
        seconds = self._test_pause.seconds
        if (point, step) != (self._test_pause.point, self._test_pause.step):
            return
        self._test_pause = None
        flag = Path(run_dir) / f".test-paused-{point}-{step}"
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text(str(os.getpid()))
        print(f"[checkpoints] TEST PAUSE at {point} (step {step}) for {seconds}s (PauseAt)",
              file=sys.stderr, flush=True)
        deadline = time.time() + seconds
        while time.time() < deadline and not self.stop_requested:  # a stop signal ends the pause
            time.sleep(0.05)

    # -- trainer hooks -----------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self.resumed_from is not None and model is not None:
            keep_adapter_dtype_on_resume(model)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if args.save_total_limit is not None:
            self.log(f"save_total_limit={args.save_total_limit}: HF may delete the last complete checkpoint before "
                     f"the new one is marked; set it to None (this callback keeps the newest {self.keep})")
        set_aside_later_checkpoints(args.output_dir, state.global_step, log=self.log)
        if self.resumed_from is not None:
            self._event(state, "resumed", path=str(self.resumed_from), changes=self.resume_changes)

    def on_step_begin(self, args, state, control, **kwargs):
        self._maybe_pause("step", state.global_step + 1, args.output_dir)

    def on_step_end(self, args, state, control, **kwargs):
        self._agree_on_stop()
        if self._should_stop():
            self._request_save_and_stop(state, control, "end of the current optimizer step")

    def on_log(self, args, state, control, **kwargs):
        if self._should_stop():
            self._request_save_and_stop(state, control, "after logging")

    def on_prediction_step(self, args, state, control, **kwargs):
        self._maybe_pause("eval", state.global_step, args.output_dir)

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation runs after on_step_end; the save decision comes right after this hook.
        if self._should_stop():
            self._request_save_and_stop(state, control, "after evaluation")

    def on_save(self, args, state, control, **kwargs):
        # Several ranks: each writes its own files (rng_state_R.pth; FSDP: its shards) and HF does not wait for
        # them, so the manifest is built only once every rank has finished its part of this save.
        distributed.barrier()
        if state.is_world_process_zero:
            started = time.time()
            ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if not ckpt.is_dir():
                self.log(f"HF reported a save but {ckpt} does not exist; no marker written")
            else:
                if self.run_config is not None:
                    write_json_atomic(ckpt / CHECKPOINT_RUN_CONFIG, self.run_config)
                for name, content in self.extra_json.items():
                    write_json_atomic(ckpt / name, content)
                self._maybe_pause("save", state.global_step, args.output_dir)
                manifest = write_complete_marker(ckpt, state.global_step)
                self.last_complete = ckpt
                size = sum(f["size"] for f in manifest["files"].values())
                self._event(state, "checkpoint", path=str(ckpt), bytes=size,
                            marker_s=round(time.time() - started, 3))
                prune_checkpoints(args.output_dir, self.keep, log=logger.info)
        if self._should_stop():
            # A signal that arrived during HF's save: this checkpoint is at the current step; stop here.
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._maybe_pause("final", state.global_step, args.output_dir)  # before the recipe saves the adapter
        self.stopped_early = self._should_stop() and state.global_step < state.max_steps
        if self.stopped_early and state.is_world_process_zero:  # rank 0 wrote the marker: it knows the path
            path = self.last_complete if self.last_complete and checkpoint_step(self.last_complete) == \
                state.global_step else None
            self._event(state, "stopped", signal=_signal_name(self._signum), checkpoint=str(path) if path else None)
            self.log(f"stopped by {_signal_name(self._signum)} at step {state.global_step}; complete checkpoint: "
                     f"{path or 'none at this step'}; run again with --resume auto to continue")

