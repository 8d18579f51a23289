"""Metrics JSONL (the contract in docs/contracts.md) and progress display for the trainer.

One callback does both so that the numbers a person sees are the numbers the files hold:
- every logging step appends a record to `logs/<run>/metrics.jsonl` (read by status, report, TensorBoard twin);
- on a terminal a tqdm bar shows step/total, loss and ETA; otherwise (a container log, a pipe) plain lines.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from training.console import format_duration
from training.jsonio import append_jsonl

log = logging.getLogger("training")


class MetricsCallback(TrainerCallback):
    """Writes metrics records, shows progress, and measures throughput for the summary."""

    def __init__(self, metrics_path: Path, run: str, show_bar: bool | None = None):
        self.metrics_path = Path(metrics_path)
        self.run = run
        self.show_bar = sys.stderr.isatty() if show_bar is None else show_bar
        self.bar = None
        self.start_time = 0.0
        self.start_step = 0
        self.tokens_start = 0
        self.last_log = (0.0, 0)  # (time, tokens) at the previous logging step
        self.tokens_per_s: float | None = None

    # --- throughput helpers ---
    @staticmethod
    def _tokens(state) -> int:
        return int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def mean_tokens_per_s(self, state) -> float | None:
        if not self.start_time:  # training never started in this process (a finished checkpoint was only saved)
            return None
        elapsed = time.time() - self.start_time
        tokens = self._tokens(state) - self.tokens_start
        return tokens / elapsed if elapsed > 0 and tokens > 0 else None

    def eta_s(self, state) -> float | None:
        done = state.global_step - self.start_step
        if done <= 0:
            return None
        per_step = (time.time() - self.start_time) / done
        return max(0.0, (state.max_steps - state.global_step) * per_step)

    # --- TrainerCallback hooks ---
    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = time.time()
        self.start_step = state.global_step
        self.tokens_start = self._tokens(state)
        self.last_log = (self.start_time, self.tokens_start)
        if self.show_bar and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.run, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step's loss, whatever logging_steps: the summary's "last" is its own
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.time(), self._tokens(state)
        record: dict[str, Any] = {"ts": now, "run": self.run, "step": state.global_step,
                                  "max_steps": state.max_steps, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            dt, dtok = now - self.last_log[0], tokens - self.last_log[1]
            self.tokens_per_s = dtok / dt if dt > 0 and dtok > 0 else self.tokens_per_s
            self.last_log = (now, tokens)
            loss = float(logs["loss"])
            record.update(loss=loss, learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                          tokens_per_s=round(self.tokens_per_s, 1) if self.tokens_per_s else None,
                          eta_s=round(self.eta_s(state), 1) if self.eta_s(state) is not None else None,
                          tokens_seen=tokens)
            if logs.get("mean_token_accuracy") is not None:  # the labelled positions' top-1 accuracy, either LM head
                record["mean_token_accuracy"] = round(float(logs["mean_token_accuracy"]), 4)
            self._show(state, f"loss={loss:.4f} lr={record['learning_rate'] or 0:.2e} "
                              f"tok/s={record['tokens_per_s'] or 0:,.0f} eta={format_duration(record['eta_s'])}")
        elif "eval_loss" in logs:
            eval_loss = float(logs["eval_loss"])
            record.update(eval_loss=eval_loss)
            self._show(state, f"eval_loss={eval_loss:.4f}")
        else:
            return  # the end-of-training summary dict: run_summary.json has it
        append_jsonl(self.metrics_path, record)

    def _show(self, state, text: str) -> None:
        line = f"step {state.global_step}/{state.max_steps} {text}"
        if self.bar is not None:
            self.bar.set_postfix_str(text.split(" lr=")[0] if " lr=" in text else text, refresh=True)
            logging.getLogger("training.file").info(line)
        else:
            log.info(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
