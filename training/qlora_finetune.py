"""QLoRA fine-tuning recipe: config -> data -> model -> trainer -> save.

Usage:
    python -m training.qlora_finetune --model-config tiny                # built-in tiny model, CPU, ~1 minute
    python -m training.qlora_finetune --model-config gemma-2b --data datasets/processed
    python -m training.qlora_finetune --model-config custom --model ORG/NAME --data PATH --set lora_r=16

Outputs (docs/contracts.md): outputs/<run>/adapter/ (PEFT adapter + tokenizer), outputs/<run>/checkpoint-N/,
outputs/<run>/runs/ (TensorBoard), outputs/<run>/run_summary.json, logs/<run>/metrics.jsonl and train.log; with an
eval split also outputs/<run>/eval.json (base vs adapter, training/evaluate.py), shown in outputs/<run>/report/.
Exit status: 0 done, 2 bad input (config, data, model path, machine too small), 1 a bug (with traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python training/qlora_finetune.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.console import quiet_libraries  # noqa: E402
from training.errors import UserError  # noqa: E402
from training.qlora_config import PRESETS, ConfigError, QLoRAConfig, resolve_config, to_dict  # noqa: E402

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
                   help="override any config key, e.g. --set lora_r=16 (repeatable)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue from the newest complete checkpoint of this run; never: start over; "
                        "PATH: that checkpoint (default: %(default)s)")
    return p


def main(argv: list[str] | None = None, callbacks: Sequence = (), pause=None) -> int:
    """The CLI. `callbacks`: extra TrainerCallbacks, `pause`: a checkpoint_callback.PauseAt (tests inject faults)."""
    args = make_parser().parse_args(argv)
    # ---------------------------------------------------------------------------------------------- config
    try:
        cfg = resolve_config(args.model_config, args.config,
                             overrides={"model_name_or_path": args.model, "data": args.data,
                                        "max_steps": args.max_steps},
                             set_items=args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_name = args.run_name or (Path(args.output_dir).name if args.output_dir else args.model_config)
    run_dir = Path(args.output_dir or Path("outputs") / run_name)
    logs_dir = Path(args.logs_dir) / run_name
    from training.distributed import is_main, rank, shutdown
    from training.console import setup_logging
    from training.runfiles import log_event

    # Several processes (GPUS=N): rank 0 writes train.log; the others print only their warnings and errors.
    setup_logging(logs_dir / "train.log" if is_main() else None, rank=rank())
    metrics_path = logs_dir / "metrics.jsonl"
    try:
        from training.oom import train_with_oom_retry

        status = train_with_oom_retry(train, cfg, preset=args.model_config,
                                      run_name=run_name, run_dir=run_dir, metrics_path=metrics_path,
                                      resume=args.resume, callbacks=callbacks, pause=pause)
        shutdown()  # not on errors: a failing rank would wait in NCCL teardown for ranks blocked in a collective
        return status
    except Exception as exc:
        user_error = isinstance(exc, UserError)  # every error the message tells the user how to fix: exit 2
        reason = {"reason": exc.reason} if getattr(exc, "reason", None) else {}
        try:
            log_event(metrics_path, run_name, 0, "failed", error=f"{type(exc).__name__}: {exc}", **reason)
        except OSError as log_exc:  # the logs' disk may be the full one: the message below still reaches the user
            log.warning("could not record the failed event in %s: %s", metrics_path, log_exc)
        if user_error:
            log.error("%s", exc)
            return 2
        log.exception("training failed")
        return 1


def train(cfg: QLoRAConfig, preset: str, run_name: str, run_dir: Path, metrics_path: Path, resume: str,
          retried: bool = False, callbacks: Sequence = (), pause=None) -> int:
    from training.data import build_datasets
    from training.metrics import MetricsCallback
    from training.runfiles import log_event
    from training.backends import apply_backend, choose_backend, resolve_attention
    from training.model import load_qlora_model, load_tokenizer, model_type_of, pick_device, plan_for_device
    from training.model_check import check_base_model
    from training.tiny import resolve_builtin
    from training import distributed

    t0 = time.time()
    quiet_libraries()
    device = pick_device(cfg, preset)  # refuses a preset the machine cannot run, before loading anything
    processes = distributed.world_size()
    # Every rank joins before the model loads (per-rank device, FSDP's low-memory loading); gloo on the CPU.
    distributed.init_process_group(cpu=device.kind == "cpu")
    model_path = resolve_builtin(cfg.model_name_or_path)
    from training.secrets import hf_token_source

    log.info("Hugging Face token: %s", hf_token_source())
    check_base_model(model_path)  # config, whole weights, tokenizer: a clear error now, not a traceback later
    log.info("run %s: preset %s, base %s, device %s", run_name, preset, cfg.model_name_or_path, device.describe())
    if processes > 1 and cfg.backend == "unsloth":
        raise ConfigError(f"backend=unsloth runs on one GPU only; with {processes} processes use --set backend=hf "
                          "(or auto), or train on one GPU (GPUS=1)")
    # unsloth (open-source) is single-GPU: several processes use transformers + peft (+ Liger when installed)
    requested = "hf" if processes > 1 else cfg.backend
    model_type = model_type_of(model_path) or ""
    backend = choose_backend(requested, device.kind, model_type)  # before model code is imported
    backend = apply_backend(backend, model_type)  # Liger's patch, and whether it took
    log.info("backend %s: %s", backend.label, backend.reason)
    if backend.name == "hf":
        attention, why = resolve_attention(cfg.attn_implementation, device.kind)
        log.info("attention %s: %s", attention, why)
        cfg = dataclasses.replace(cfg, attn_implementation=attention)
    elif cfg.packing:  # unsloth's Gemma-2 attention ignores the per-sample boundaries of packed rows
        log.info("packing off: backend unsloth cannot keep packed samples apart (one sample per row instead)")
        cfg = dataclasses.replace(cfg, packing=False)
    cfg, plan_line = plan_for_device(cfg, device, backend.label)  # micro-batch + checkpointing, from what applied
    log.info("%s", plan_line)
    from training.oom import PlanUsed, oom_guard

    planned = PlanUsed(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing,
                       cfg.max_seq_length, device.kind == "cuda" and cfg.plan_memory, plan_line, device)
    # Tokens per optimizer step stay the config's (one GPU's micro-batch x accumulation) whatever the GPU count.
    batch = distributed.split_global_batch(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                                           processes)
    if processes > 1:
        log.info("%s processes%s: %s", processes, " (FSDP)" if distributed.fsdp_enabled() else " (DDP)",
                 batch.describe(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps))
        cfg = dataclasses.replace(cfg, per_device_train_batch_size=batch.micro_batch,
                                  gradient_accumulation_steps=batch.accumulation)

    # ---------------------------------------------------------------------------------------------- resume
    from training.checkpoint_callback import CheckpointCallback
    from training.checkpoints import check_resume_compatible, load_finished_checkpoint, read_manifest, resolve_resume
    from training.disk import disk_full_guard, preflight_disk, remove_partial_saves

    resume_from = resolve_resume(resume, run_dir, log=log.warning)  # a bad PATH is an error, never a fresh start
    resume_changes = check_resume_compatible(resume_from, to_dict(cfg), log=log.warning) if resume_from else []
    # The step its COMPLETE manifest records (every checkpoint resume picks has one), whatever the folder is called
    resume_step = (read_manifest(resume_from) or {}).get("step") if resume_from is not None else None
    if resume_step is not None and resume_step >= cfg.max_steps and finished_at(run_dir, resume_step):
        log.info("run %s already finished at step %d (adapter in %s): nothing to train; a larger --max-steps "
                 "trains on, --resume never starts over", run_name, resume_step, run_dir / "adapter")
        return 0
    if distributed.is_main():
        remove_partial_saves(run_dir, checkpoints=False)  # a .tmp-adapter/ left by a crash during the final save
        preflight_disk(cfg, model_path, run_dir, resume_step or 0, log=log.warning)

    # ------------------------------------------------------------------------------------------------ data
    tokenizer = load_tokenizer(model_path)
    from training.templates import apply_chat_template_file

    apply_chat_template_file(tokenizer, cfg.chat_template)  # "": the model's own (a tokenizer without one: refused)
    train_ds, eval_ds, stats = build_datasets(cfg.data, tokenizer, cfg.max_seq_length, cfg.eval_fraction,
                                              cfg.seed, cfg.completion_only_loss)
    summary = stats.summary()
    from training.data_fingerprint import check_resume_data, data_fingerprint
    from training.runfiles import DATA_FINGERPRINT as FINGERPRINT_NAME

    fingerprint = data_fingerprint(cfg.data, train_ds, eval_ds, cfg.eval_fraction, cfg.seed)
    data_changes = (check_resume_data(resume_from, fingerprint, cfg.resume_with_new_data, log=log.warning)
                    if resume_from is not None else [])
    log.info("data %s: %s; %d train / %d eval examples; %d truncated at %d tokens", cfg.data,
             summary["records_per_format"], stats.n_train, stats.n_eval, stats.truncated, cfg.max_seq_length)
    rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    if cfg.packing:
        mean_len = sum(stats.lengths) / max(len(stats.lengths), 1)
        log.info("packing on (exact: per-sample attention): %d rows of up to %d tokens per optimizer step, about "
                 "%.0f samples per row (mean %.0f tokens); --set packing=false trains one sample per row",
                 rows, cfg.max_seq_length, cfg.max_seq_length / max(min(mean_len, cfg.max_seq_length), 1), mean_len)
    else:
        log.info("packing off: %d samples per optimizer step, one per row, padded to the longest in its batch", rows)

    # ----------------------------------------------------------------------------------------------- model
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA A matrices start random: seed them, or same-seed runs differ (the Trainer seeds later)
    with oom_guard(lambda: planned, lambda: None, run_dir, retried):
        model = load_qlora_model(cfg, model_path, device, backend.label)

    # --------------------------------------------------------------------------------------------- trainer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from training.tracking import resolve_report_to

    report_to = resolve_report_to(cfg.report_to, metrics_path.parent)  # W&B can never stop the run
    sft_args = SFTConfig(
        output_dir=str(run_dir),
        run_name=run_name,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        # the loader set checkpointing up per layer (unsloth its own, with offload): the Trainer must not redo it
        **checkpointing_args(SFTConfig, False),
        bf16=device.bf16,
        fp16=device.fp16,
        use_cpu=device.kind == "cpu",
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # retention happens after the completeness marker (training/checkpoints.py)
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=cfg.eval_steps,
        report_to=report_to,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=cfg.dataloader_num_workers,
        seed=cfg.seed,
        data_seed=cfg.seed,
        ignore_data_skip=bool(data_changes),  # changed data: the checkpoint's position in it means nothing
        disable_tqdm=True,  # MetricsCallback draws its own bar with the loss
        # LoRA under DDP: every trainable parameter gets a gradient each step, so skip DDP's unused-parameter scan
        # (its default for a PeftModel), which costs a graph traversal per step and warns.
        **({"ddp_find_unused_parameters": False} if processes > 1 else {}),
    )
    metrics_cb = MetricsCallback(metrics_path, run_name)
    # From here on SIGTERM/SIGINT = finish the step, save a complete checkpoint, stop (a second one: exit at once).
    checkpoint_cb = CheckpointCallback(run_name=run_name, metrics_path=metrics_path, run_config=to_dict(cfg),
                                       keep=cfg.keep_checkpoints, resumed_from=resume_from,
                                       resume_changes=resume_changes, extra_json={FINGERPRINT_NAME: fingerprint},
                                       log=log.warning, pause=pause)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[metrics_cb, checkpoint_cb, *callbacks])
    trainer.remove_callback(PrinterCallback)

    log_event(metrics_path, run_name, 0, "start", preset=preset, device=device.describe(), max_steps=cfg.max_steps,
              processes=processes, global_batch=batch.sequences)
    if data_changes:
        log_event(metrics_path, run_name, resume_step or 0, "data_changed", checkpoint=str(resume_from),
                  changes=data_changes, data_position="reset")
    if resume_step is not None and resume_step >= cfg.max_steps and not distributed.fsdp_enabled():
        # Stopped after its last checkpoint but before the final save: nothing left to train, only to save. (FSDP
        # checkpoints hold shards, not the adapter: there HF's resume trains one step past max_steps instead.)
        log.info("%s is at step %d, max_steps is %d: saving its adapter without training (a larger --max-steps "
                 "trains on; --resume never starts over)", resume_from.name, resume_step, cfg.max_steps)
        load_finished_checkpoint(trainer, resume_from)
        log_event(metrics_path, run_name, trainer.state.global_step, "resumed", path=str(resume_from),
                  changes=resume_changes)
        train_loss_mean = None
    else:
        # CUDA OOM or a full disk: the partial checkpoint is removed, complete ones stay, exit 2 with the fix
        with oom_guard(lambda: planned, lambda: trainer.state.global_step, run_dir, retried), \
                disk_full_guard(run_dir):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if checkpoint_cb.exit_status is not None:  # stopped by a signal: its complete checkpoint is where to resume
            return checkpoint_cb.exit_status
        train_loss_mean = result.training_loss

    # ------------------------------------------------------------------------------------------------ save
    adapter_dir = run_dir / "adapter"
    with disk_full_guard(run_dir):
        if not save_adapter(trainer, tokenizer, model_path, adapter_dir):
            return 0  # rank 0 writes the adapter, the summary and the `finished` event
    state = trainer.state
    # The whole run's curve (a resumed run's state carries the earlier attempts' records too)
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    run_summary = {
        "run": run_name,
        "preset": preset,
        "status": "finished",
        "config": to_dict(cfg),
        "base_model_path": model_path,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "eval_loss_last": eval_losses[-1] if eval_losses else None,
        "train_loss_mean": train_loss_mean,
        "tokens_per_s": round(tps, 1) if (tps := metrics_cb.mean_tokens_per_s(state)) is not None else None,
        "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0),
        "duration_s": round(time.time() - t0, 1),
        "device": device.describe(),
        "processes": processes,
        "global_batch": batch.sequences,
        "backend": backend.label,
        "backend_reason": backend.reason,
        "plan": plan_line,
        "data": summary,
        "adapter_dir": str(adapter_dir),
        "versions": library_versions(),
    }
    from training.jsonl import write_json_atomic

    with disk_full_guard(run_dir):
        write_json_atomic(run_dir / "run_summary.json", run_summary)
    log_event(metrics_path, run_name, state.global_step, "finished", train_loss_last=run_summary["train_loss_last"])
    if eval_ds is not None:  # base vs adapter into eval.json (and so the report), loaded from the files as make eval
        del trainer, model
        write_run_eval(run_dir, cfg)
    write_run_report(metrics_path.parent.parent, run_name, run_dir)
    log.info("done in %.0fs: loss %.4f -> %.4f; adapter in %s", run_summary["duration_s"],
             run_summary["train_loss_first"] or float("nan"), run_summary["train_loss_last"] or float("nan"),
             adapter_dir)
    return 0


def save_adapter(trainer, tokenizer, model_path: str, adapter_dir: Path) -> bool:
    """Write the final adapter (+ tokenizer) into .tmp-adapter/, then rename it to adapter/: a crash or a full disk
    never leaves half an adapter. Under FSDP every rank takes part; only rank 0 writes. Returns whether it wrote."""
    from training import distributed
    from training.checkpoints import fsync_dir, remove_tree_atomically
    from training.runfiles import ADAPTER_TMP_DIR as ADAPTER_TMP_NAME

    tmp = adapter_dir.with_name(ADAPTER_TMP_NAME)
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
    if adapter_dir.exists():
        remove_tree_atomically(adapter_dir)  # the previous attempt's (a resumed run with more --max-steps)
    os.replace(tmp, adapter_dir)
    fsync_dir(adapter_dir.parent)
    return True


def finished_at(run_dir: Path, step: int) -> bool:
    """Whether the run already ended normally at `step`: its summary says so and its adapter is there."""
    import json

    try:
        summary = json.loads((run_dir / "run_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (summary.get("status") == "finished" and summary.get("steps") == step
            and (run_dir / "adapter" / "adapter_config.json").is_file())


def write_run_eval(run_dir: Path, cfg: QLoRAConfig) -> None:
    """Held-out loss and answers of the base and the adapter; an evaluation problem never fails a finished run."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trainer's copy of the model is gone: room for the evaluation's
    try:
        from training.evaluate import run_eval

        log.info("eval: %s", run_eval(run_dir.parent, run_dir.name, n_prompts=cfg.eval_prompts,
                                      max_new_tokens=cfg.eval_max_new_tokens))
    except Exception as exc:  # noqa: BLE001 - the adapter is saved; say why and go on
        log.warning("base vs adapter evaluation not written (%s: %s); make eval RUN=%s retries", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "", run_dir.name)


def write_run_report(logs_dir: Path, run_name: str, run_dir: Path) -> None:
    """Plots and a summary next to the outputs; a report problem never fails a finished run."""
    try:
        from training.report import write_report

        log.info("report: %s", write_report(logs_dir, run_name, run_dir.parent, report_dir=run_dir / "report"))
    except Exception as exc:  # matplotlib missing or a plotting bug: the adapter is saved, say so and go on
        log.warning("run report not written (%s); make report RUN=%s retries", exc, run_name)


def checkpointing_args(config_cls, enabled: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; accept both."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False}}


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
