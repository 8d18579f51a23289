"""QLoRA fine-tuning recipe: prepare (device, backend, plan, where to start) -> data -> model -> trainer -> finish.

Usage:
    python -m training.qlora_finetune --model-config tiny                # built-in tiny model, CPU, ~1 minute
    python -m training.qlora_finetune --model-config gemma-2b --data datasets/processed
    python -m training.qlora_finetune --model-config custom --model ORG/NAME --data PATH --set lora_r=16

Outputs (docs/contracts.md, names in training/runfiles.py): outputs/<run>/adapter/ (PEFT adapter + tokenizer),
outputs/<run>/checkpoint-N/, outputs/<run>/runs/ (TensorBoard), outputs/<run>/run_summary.json,
logs/<run>/metrics.jsonl and train.log; with an eval split also outputs/<run>/eval.json (base vs adapter,
training/evaluate.py), shown in outputs/<run>/report/.
Exit status: 0 done, 2 bad input (config, data, model path, machine too small), 1 a bug (with traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as `python training/qlora_finetune.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import distributed  # noqa: E402
from training.console import quiet_libraries, setup_logging  # noqa: E402
from training.errors import UserError  # noqa: E402
from training.qlora_config import PRESETS, ConfigError, QLoRAConfig, resolve_config, to_dict  # noqa: E402
from training.resume import AlreadyDone, SaveOnly, Start, decide_start  # noqa: E402
from training.runfiles import DATA_FINGERPRINT, RunPaths, log_event  # noqa: E402

log = logging.getLogger("training")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.qlora_finetune", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="tiny", metavar="PRESET",
                   help=f"preset: {', '.join(PRESETS)} (default: %(default)s)")
    p.add_argument("--model", help="base model: Hugging Face id or local folder (overrides the preset)")
    p.add_argument("--data", help="training data: file or folder (.jsonl/.json/.parquet/.csv/save_to_disk)")
    p.add_argument("--output-dir", help="run folder (default: outputs/<run-name>)")
    p.add_argument("--run-name", help="run name (default: the output folder's name, else the preset)")
    p.add_argument("--logs-dir", default=os.environ.get("LOGS_DIR", "logs"), help="default: %(default)s")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides the preset)")
    p.add_argument("--config", help="YAML file of config keys (between the preset and the flags)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set lora_r=16, or pass any TRL SFTConfig argument the "
                        "recipe does not set itself, e.g. --set adam_beta2=0.95 (repeatable)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue from the newest complete checkpoint of this run; never: start over; "
                        "PATH: that checkpoint (default: %(default)s)")
    return p


def main(argv: list[str] | None = None, callbacks: Sequence = (), pause=None) -> int:
    """The CLI. `callbacks`: extra TrainerCallbacks, `pause`: a checkpoint_callback.PauseAt (tests inject faults)."""
    args = make_parser().parse_args(argv)
    try:
        cfg = resolve_config(args.model_config, args.config, set_items=args.set,
                             overrides={"model_name_or_path": args.model, "data": args.data, "max_steps": args.max_steps})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_name = args.run_name or (Path(args.output_dir).name if args.output_dir else args.model_config)
    paths = RunPaths.of(run_name, args.output_dir, logs_root=args.logs_dir)
    # Several processes (GPUS=N): rank 0 writes train.log; the others print only their warnings and errors.
    setup_logging(paths.train_log if distributed.is_main() else None, rank=distributed.rank())
    try:
        from training.oom import train_with_oom_retry

        status = train_with_oom_retry(train, cfg, preset=args.model_config, paths=paths, resume=args.resume,
                                      callbacks=callbacks, pause=pause)
        distributed.shutdown()  # not on errors: a failing rank would wait in NCCL teardown for a blocked collective
        return status
    except Exception as exc:
        return report_failure(exc, paths)


def report_failure(exc: Exception, paths: RunPaths) -> int:
    """A `failed` event, then exit 2 with the message for every error the user fixes, 1 with a traceback for a bug."""
    reason = {"reason": exc.reason} if getattr(exc, "reason", None) else {}
    try:
        log_event(paths.metrics, paths.name, 0, "failed", error=f"{type(exc).__name__}: {exc}", **reason)
    except OSError as log_exc:  # the logs' disk may be the full one: the message below still reaches the user
        log.warning("could not record the failed event in %s: %s", paths.metrics, log_exc)
    if isinstance(exc, UserError):
        log.error("%s", exc)
        return 2
    log.exception("training failed")
    return 1


def train(cfg: QLoRAConfig, preset: str, paths: RunPaths, resume: str, retried: bool = False,
          callbacks: Sequence = (), pause=None) -> int:
    """One attempt (training/oom.py may call it again with half the micro-batch): the run's exit status."""
    t0 = time.time()
    setup = prepare(cfg, preset, paths, resume)
    if isinstance(setup.start, AlreadyDone):
        log.info("run %s already finished at step %d (adapter in %s): nothing to train; a larger --max-steps trains "
                 "on, --resume never starts over", paths.name, setup.start.step, paths.adapter)
        return 0
    data = load_data(setup)
    outcome = fit(setup, data, paths, retried, callbacks, pause, t0)  # model and trainer live only in there
    return outcome if isinstance(outcome, int) else finish(setup, data, paths, outcome)


def fit(setup: RunSetup, data: RunData, paths: RunPaths, retried: bool, callbacks: Sequence, pause,
        t0: float) -> dict | int:
    """Load the model, train (or only save a finished checkpoint), save: the run summary, or the exit status of a
    run stopped by a signal (its complete checkpoint is where to resume), or 0 on ranks that do not write."""
    from transformers import set_seed

    from training.disk import disk_full_guard
    from training.oom import oom_guard

    set_seed(setup.cfg.seed)  # LoRA A starts random: seed it, or same-seed runs differ (the Trainer seeds later)
    with oom_guard(lambda: setup.planned, lambda: None, paths.run_dir, retried):
        model = setup.backend.load(setup.cfg, setup.model_path, setup.device)
    trainer, metrics_cb, checkpoint_cb = build_trainer(setup, data, model, paths, callbacks, pause)
    start = setup.start
    log_event(paths.metrics, paths.name, 0, "start", preset=setup.preset, device=setup.device.describe(),
              max_steps=setup.cfg.max_steps, processes=setup.processes, global_batch=setup.batch.sequences)
    if data.changes:
        log_event(paths.metrics, paths.name, start.step, "data_changed", checkpoint=str(start.checkpoint),
                  changes=data.changes, data_position="reset")
    if isinstance(start, SaveOnly):
        from training.checkpoints import load_finished_checkpoint

        log.info("%s is at step %d, max_steps is %d: saving its adapter without training (a larger --max-steps "
                 "trains on; --resume never starts over)", start.checkpoint.name, start.step, setup.cfg.max_steps)
        load_finished_checkpoint(trainer, start.checkpoint)
        log_event(paths.metrics, paths.name, trainer.state.global_step, "resumed", path=str(start.checkpoint),
                  changes=start.changes)
        loss_mean = None
    else:
        # CUDA OOM or a full disk: the partial checkpoint is removed, complete ones stay, exit 2 with the fix
        with oom_guard(lambda: setup.planned, lambda: trainer.state.global_step, paths.run_dir, retried), \
                disk_full_guard(paths.run_dir):
            resume_from = str(start.checkpoint) if start.checkpoint else None
            loss_mean = trainer.train(resume_from_checkpoint=resume_from).training_loss
        if checkpoint_cb.exit_status is not None:
            return checkpoint_cb.exit_status
    return save_run(trainer, setup, data, paths, metrics_cb, loss_mean, t0) or 0


# ------------------------------------------------------------------------------------------------ prepare

@dataclass(frozen=True)
class RunSetup:
    """Everything decided before data and weights load."""

    cfg: QLoRAConfig  # as trained: the backend's settings and the planner's batch applied
    preset: str
    model_path: str  # the base model's folder or hub id (builtin: resolved)
    device: Any  # training.device.Device
    backend: Any  # training.backends.Backend, as applied
    plan_line: str
    planned: Any  # training.oom.PlanUsed: one GPU's view, for the out-of-memory message
    processes: int
    batch: Any  # training.distributed.GlobalBatch
    start: Start


def prepare(cfg: QLoRAConfig, preset: str, paths: RunPaths, resume: str = "never") -> RunSetup:
    """Device, base model check, backend (applied), memory plan, batch over processes, where to start; refuses
    what cannot run before anything large loads. The benchmark (scripts/benchmark.py) starts its rows here too."""
    from training.backends import select_backend
    from training.device import pick_device
    from training.disk import preflight_disk, remove_partial_saves
    from training.model import attention_shape_of, check_base_model
    from training.oom import PlanUsed
    from training.plan import plan_for_run
    from training.secrets import hf_token_source
    from training.tiny import resolve_builtin

    quiet_libraries()
    device = pick_device(cfg, preset)  # refuses a preset the machine cannot run, before loading anything
    processes = distributed.world_size()
    # Every rank joins before the model loads (per-rank device, FSDP's low-memory loading); gloo on the CPU.
    distributed.init_process_group(cpu=device.kind == "cpu")
    model_path = resolve_builtin(cfg.model_name_or_path)
    log.info("Hugging Face token: %s", hf_token_source())
    base_config = check_base_model(model_path)  # config, whole weights, tokenizer: a clear error now, not later
    log.info("run %s: preset %s, base %s, device %s", paths.name, preset, cfg.model_name_or_path, device.describe())
    backend = select_backend(cfg.backend, device.kind, base_config.model_type or "", processes)
    cfg = backend.configure(cfg, device.kind, attention_shape_of(base_config))  # attention (hf) or unpacked rows (unsloth)
    cfg, plan_line = plan_for_run(cfg, device, backend)  # micro-batch + checkpointing, from what was applied
    log.info("%s", plan_line)
    planned = PlanUsed(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing,
                       cfg.max_seq_length, device.kind == "cuda" and cfg.plan_memory, plan_line, device)
    # Tokens per optimizer step stay the config's (one GPU's micro-batch x accumulation) whatever the GPU count.
    batch = distributed.split_global_batch(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, processes)
    if processes > 1:
        log.info("%s processes%s: %s", processes, " (FSDP)" if distributed.fsdp_enabled() else " (DDP)",
                 batch.describe(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps))
        cfg = dataclasses.replace(cfg, per_device_train_batch_size=batch.micro_batch,
                                  gradient_accumulation_steps=batch.accumulation)
    start = decide_start(resume, paths.run_dir, to_dict(cfg), cfg.max_steps, distributed.fsdp_enabled(), log.warning)
    if distributed.is_main() and not isinstance(start, AlreadyDone):
        remove_partial_saves(paths.run_dir, checkpoints=False)  # a .tmp-adapter/ left by a crash in the final save
        preflight_disk(cfg, model_path, paths.run_dir, start.step, log=log.warning)
    return RunSetup(cfg, preset, model_path, device, backend, plan_line, planned, processes, batch, start)


# ------------------------------------------------------------------------------------------------ data

@dataclass(frozen=True)
class RunData:
    tokenizer: Any
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset or None
    stats: Any  # training.data.DataStats
    fingerprint: dict
    changes: list[str]  # how the data differs from the checkpoint's (only with resume_with_new_data)


def load_data(setup: RunSetup) -> RunData:
    """Tokenizer (and chat template), the train/eval split, and the check that a resumed run sees the same data."""
    from training.data import build_datasets
    from training.data_fingerprint import check_resume_data, data_fingerprint
    from training.model import load_tokenizer
    from training.templates import apply_chat_template_file

    cfg = setup.cfg
    tokenizer = load_tokenizer(setup.model_path)
    apply_chat_template_file(tokenizer, cfg.chat_template)  # "": the model's own (a tokenizer without one: refused)
    train_ds, eval_ds, stats = build_datasets(cfg.data, tokenizer, cfg.max_seq_length, cfg.eval_fraction, cfg.seed,
                                              cfg.completion_only_loss)
    fingerprint = data_fingerprint(cfg.data, train_ds, eval_ds, cfg.eval_fraction, cfg.seed)
    checkpoint = setup.start.checkpoint
    changes = (check_resume_data(checkpoint, fingerprint, cfg.resume_with_new_data, log=log.warning)
               if checkpoint is not None else [])
    log.info("data %s: %s; %d train / %d eval examples; %d truncated at %d tokens", cfg.data,
             stats.summary()["records_per_format"], stats.n_train, stats.n_eval, stats.truncated, cfg.max_seq_length)
    rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * setup.processes
    if cfg.packing:
        mean_len = sum(stats.lengths) / max(len(stats.lengths), 1)
        log.info("packing on (exact: per-sample attention): %d rows of up to %d tokens per optimizer step, about "
                 "%.0f samples per row (mean %.0f tokens); --set packing=false trains one sample per row",
                 rows, cfg.max_seq_length, cfg.max_seq_length / max(min(mean_len, cfg.max_seq_length), 1), mean_len)
    else:
        log.info("packing off: %d samples per optimizer step, one per row, padded to the longest in its batch", rows)
    return RunData(tokenizer, train_ds, eval_ds, stats, fingerprint, changes)


# ------------------------------------------------------------------------------------------------ trainer

def build_trainer(setup: RunSetup, data: RunData, model, paths: RunPaths, callbacks: Sequence, pause):
    """SFTTrainer with the metrics callback and the checkpoint callback (from here on SIGTERM/SIGINT = finish the
    step, save a complete checkpoint, stop; a second signal exits at once). Returns (trainer, metrics, checkpoints)."""
    from transformers.trainer_callback import PrinterCallback

    from training.checkpoint_callback import CheckpointCallback
    from training.lm_head import trainer_class
    from training.metrics import MetricsCallback
    from training.optim import optimizer_cls_and_kwargs
    from training.trainer_args import sft_config

    args = sft_config(setup.cfg, setup.device, paths, has_eval=data.eval is not None, processes=setup.processes,
                      data_changed=bool(data.changes))
    metrics_cb = MetricsCallback(paths.metrics, paths.name)
    checkpoint_cb = CheckpointCallback(run_name=paths.name, metrics_path=paths.metrics, run_config=to_dict(setup.cfg),
                                       keep=setup.cfg.keep_checkpoints, resumed_from=setup.start.checkpoint,
                                       resume_changes=setup.start.changes,
                                       extra_json={DATA_FINGERPRINT: data.fingerprint}, log=log.warning, pause=pause)
    trainer_cls = trainer_class(setup.cfg.lm_head, token_accuracy=setup.device.kind == "cuda")  # CUDA: Liger runs
    trainer = trainer_cls(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                          processing_class=data.tokenizer, callbacks=[metrics_cb, checkpoint_cb, *callbacks],
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args))
    trainer.remove_callback(PrinterCallback)
    return trainer, metrics_cb, checkpoint_cb


# ------------------------------------------------------------------------------------------------ finish

def save_run(trainer, setup: RunSetup, data: RunData, paths: RunPaths, metrics_cb, loss_mean: float | None,
             t0: float) -> dict | None:
    """The adapter (atomically), run_summary.json and the `finished` event; rank 0 writes, the others get None."""
    from training.disk import disk_full_guard
    from training.jsonio import write_json_atomic

    with disk_full_guard(paths.run_dir):
        if not save_adapter(trainer, data.tokenizer, setup.model_path, paths):
            return None
        summary = run_summary(trainer.state, setup, data, paths, metrics_cb, loss_mean, time.time() - t0)
        write_json_atomic(paths.summary, summary)
    log_event(paths.metrics, paths.name, trainer.state.global_step, "finished",
              train_loss_last=summary["train_loss_last"])
    return summary


def finish(setup: RunSetup, data: RunData, paths: RunPaths, summary: dict) -> int:
    """Base vs adapter on the held-out split (eval.json, loaded from the files as make eval), then the report."""
    from training.report import write_run_report

    if data.eval is not None:
        write_run_eval(paths, setup.cfg)
    write_run_report(paths)
    log.info("done in %.0fs: loss %.4f -> %.4f; adapter in %s", summary["duration_s"],
             summary["train_loss_first"] or float("nan"), summary["train_loss_last"] or float("nan"), paths.adapter)
    return 0


def run_summary(state, setup: RunSetup, data: RunData, paths: RunPaths, metrics_cb, loss_mean: float | None,
                duration_s: float) -> dict:
    # The whole run's curve (a resumed run's state carries the earlier attempts' records too)
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    tps = metrics_cb.mean_tokens_per_s(state)
    return {
        "run": paths.name, "preset": setup.preset, "status": "finished", "config": to_dict(setup.cfg),
        "base_model_path": setup.model_path, "steps": state.global_step, "max_steps": state.max_steps,
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "eval_loss_last": eval_losses[-1] if eval_losses else None, "train_loss_mean": loss_mean,
        "tokens_per_s": round(tps, 1) if tps is not None else None,
        "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0), "duration_s": round(duration_s, 1),
        "device": setup.device.describe(), "processes": setup.processes, "global_batch": setup.batch.sequences,
        "backend": setup.backend.label, "backend_reason": setup.backend.reason, "plan": setup.plan_line,
        "data": data.stats.summary(), "adapter_dir": str(paths.adapter), "versions": library_versions(),
    }


def save_adapter(trainer, tokenizer, model_path: str, paths: RunPaths) -> bool:
    """Write the final adapter (+ tokenizer) into .tmp-adapter/, then rename it to adapter/: a crash or a full disk
    never leaves half an adapter. Under FSDP every rank takes part; only rank 0 writes. Returns whether it wrote."""
    from training.checkpoints import fsync_dir, remove_tree_atomically

    tmp = paths.adapter_tmp
    if distributed.fsdp_enabled():
        # FSDP holds shards: gather the full adapter state (a collective: every rank), the Trainer writes on rank 0.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(tmp))
    if not distributed.is_main():
        return False
    if not distributed.fsdp_enabled():
        trainer.model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if (Path(model_path) / "tokenizer.model").is_file():  # GGUF export needs the SentencePiece file
        (tmp / "tokenizer.model").write_bytes((Path(model_path) / "tokenizer.model").read_bytes())
    if paths.adapter.exists():
        remove_tree_atomically(paths.adapter)  # the previous attempt's (a resumed run with more --max-steps)
    os.replace(tmp, paths.adapter)
    fsync_dir(paths.run_dir)
    return True


def write_run_eval(paths: RunPaths, cfg: QLoRAConfig) -> None:
    """Held-out loss and answers of the base and the adapter; an evaluation problem never fails a finished run."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trainer's copy of the model is gone: room for the evaluation's
    try:
        from training.evaluate import run_eval

        log.info("eval: %s", run_eval(paths.run_dir.parent, paths.run_dir.name, n_prompts=cfg.eval_prompts,
                                      max_new_tokens=cfg.eval_max_new_tokens))
    except Exception as exc:  # noqa: BLE001 - the adapter is saved; say why and go on
        log.warning("base vs adapter evaluation not written (%s: %s); make eval RUN=%s retries", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "", paths.run_dir.name)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


if __name__ == "__main__":
    sys.exit(main())
