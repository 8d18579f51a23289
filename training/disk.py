"""Disk space: what a run will write, checked before it starts, and a full disk during a save turned into a clean stop.

Preflight (`preflight_disk`): the adapter, up to keep_checkpoints + 1 checkpoints at once (the new one is complete
before the oldest is deleted), each the adapter + optimizer state + tokenizer files + trainer state, and the logs,
against the free space of the output disk: refused when it cannot fit, a warning when it is tight.

During the run (`disk_full_guard`): ENOSPC while a checkpoint or the final adapter is written removes the partial
folder (a checkpoint without its COMPLETE marker, or `.tmp-adapter/`), leaves every complete checkpoint as it was,
and raises DiskFullError (exit 2) naming the folder, the free space and the fix. The same command run again after
space is freed resumes from the newest complete checkpoint (training/checkpoints.py).
"""

from __future__ import annotations

import errno
import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from training.checkpoints import iter_complete_checkpoints, read_manifest, remove_tree_atomically
from training.errors import UserError
from training.qlora_config import eight_bit_moments
from training.runfiles import ADAPTER_TMP_DIR

MIB = 2**20
TIGHT_FRACTION = 0.9  # warn when the estimate takes more than this share of the free space
HUB_TOKENIZER_BYTES = 40 * MIB  # tokenizer files of a hub model not on disk yet (Gemma's: ~22 MB)
CHECKPOINT_FIXED_BYTES = 64 * 1024  # rng state, scheduler, training args, README per checkpoint
LOG_RECORD_BYTES = 2048  # per logging step: metrics.jsonl, train.log, TensorBoard events
STATE_RECORD_BYTES = 400  # per logging step: the log history in each checkpoint's trainer_state.json
REPORT_BYTES = MIB // 2  # the end-of-run report (plots: ~60 KB each)
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


class DiskFullError(UserError, RuntimeError):
    """The output disk cannot hold what the run writes; the message gives the numbers and the fix."""

    reason = "disk_full"


def free_bytes(path: str | Path) -> tuple[int, Path]:
    """Free bytes of the disk that holds `path` (or would: its nearest existing parent), and that folder."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free, p


def _lora_matrices(arch, r: int) -> list[int]:
    """Element counts of the LoRA A and B matrices of all-linear LoRA (q, k, v, o, gate, up, down per layer)."""
    h, q, kv, inter = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return [n for i, o in per_layer for n in (r * i, o * r)] * arch.num_layers


def _optimizer_bytes(sizes: list[int], optim: str) -> int:
    if not eight_bit_moments(optim):
        return sum(8 * n for n in sizes)  # two fp32 moments
    # bitsandbytes: 8-bit moments, one fp32 absmax per 256 values and two 256-entry fp32 quantisation maps for
    # tensors of 4096+ values; two fp32 moments below that
    return sum(2 * n + 8 * math.ceil(n / 256) + 2048 if n >= 4096 else 8 * n for n in sizes)


def _tokenizer_bytes(model_path: str) -> int:
    folder = Path(model_path)
    if not folder.is_dir():
        return HUB_TOKENIZER_BYTES
    return sum(f.stat().st_size for g in TOKENIZER_GLOBS for f in folder.glob(g) if f.is_file())


def estimate_run_bytes(cfg, model_path: str, run_dir: Path, start_step: int = 0) -> dict[str, int]:
    """What the run will add to the output disk, by part (bytes)."""
    from training.plan import arch_for

    sizes = _lora_matrices(arch_for(model_path), cfg.lora_r)
    adapter = 2 * sum(sizes)  # TRL keeps QLoRA adapters in bf16 (measured: 36 KB for the tiny preset's 16k values)
    tokenizer = _tokenizer_bytes(model_path)
    records = cfg.max_steps // cfg.logging_steps + 1
    logs = records * LOG_RECORD_BYTES
    checkpoint = (adapter + _optimizer_bytes(sizes, cfg.optim) + tokenizer + CHECKPOINT_FIXED_BYTES
                  + records * STATE_RECORD_BYTES)
    saves = max(1, math.ceil((cfg.max_steps - start_step) / cfg.save_steps))
    existing = sum(1 for c in iter_complete_checkpoints(run_dir, level="marker") if c.complete)
    at_once = max(1, min(cfg.keep_checkpoints + 1 - existing, saves))
    return {"checkpoint": checkpoint, "checkpoints_at_once": at_once, "checkpoints": at_once * checkpoint,
            "adapter": adapter + tokenizer, "logs": logs + REPORT_BYTES,
            "total": at_once * checkpoint + adapter + tokenizer + logs + REPORT_BYTES}


def preflight_disk(cfg, model_path: str, run_dir: Path, start_step: int, log: Callable[[str], None]) -> None:
    """Refuse (DiskFullError) a run whose output cannot fit on its disk; warn when it is tight."""
    est = estimate_run_bytes(cfg, model_path, run_dir, start_step)
    free, where = free_bytes(run_dir)
    numbers = (f"about {est['total'] / MIB:.1f} MiB: {est['checkpoints_at_once']} checkpoint(s) at once x "
               f"{est['checkpoint'] / MIB:.2f} MiB (keep_checkpoints={cfg.keep_checkpoints}, one more while the "
               f"next is written), adapter {est['adapter'] / MIB:.2f} MiB, logs and report {est['logs'] / MIB:.1f} "
               f"MiB; {free / MIB:.1f} MiB free on the disk of {where}")
    if est["total"] > free:
        if not cfg.disk_check:
            log(f"disk check off (disk_check=false): the run needs {numbers}; it will stop at the first save that "
                "does not fit")
            return
        raise DiskFullError(f"not enough disk space for run folder {run_dir}: it needs {numbers}. Free space, "
                            f"keep fewer checkpoints (--set keep_checkpoints=1), point --output-dir at a larger "
                            f"disk, or --set disk_check=false to start anyway")
    if est["total"] > TIGHT_FRACTION * free:
        log(f"disk space is tight for {run_dir}: the run needs {numbers}")


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """Whether an exception from a save means the disk is full: ENOSPC/EDQUOT anywhere in its chain, the
    safetensors/torch messages for it, or torch's generic write failures with no space left on `path`'s disk."""
    seen = exception_chain(exc)
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in seen):
        return True
    text = " ".join(str(e) for e in seen)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    generic = ("file write failed", "basic_ios::clear", "iostream error", "unexpected pos")
    try:
        return any(g in text for g in generic) and free_bytes(path)[0] < MIB
    except OSError:
        return False


def exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes/contexts, outermost first."""
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def remove_partial_saves(run_dir: Path, checkpoints: bool = True) -> list[Path]:
    """Delete checkpoint folders without their COMPLETE marker (unless checkpoints=False) and a leftover
    `.tmp-adapter/`; complete checkpoints are never touched. Returns what was removed."""
    removed = []
    for ckpt in iter_complete_checkpoints(run_dir, level="marker", newest_first=False) if checkpoints else []:
        if not ckpt.complete:
            remove_tree_atomically(ckpt.path)
            removed.append(ckpt.path)
    tmp = run_dir / ADAPTER_TMP_DIR
    if tmp.exists():
        remove_tree_atomically(tmp)
        removed.append(tmp)
    return removed


@contextmanager
def disk_full_guard(run_dir: Path) -> Iterator[None]:
    """Turn a full disk during training or the final save into DiskFullError after removing the partial folder."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc, run_dir):
            raise
        removed = remove_partial_saves(run_dir)
        raise DiskFullError(disk_full_message(run_dir, removed, exc)) from None


def disk_full_message(run_dir: Path, removed: list[Path], exc: BaseException) -> str:
    free, where = free_bytes(run_dir)
    complete = [c.path for c in iter_complete_checkpoints(run_dir, level="marker", newest_first=False) if c.complete]
    written = next((str(e.filename) for e in exception_chain(exc) if isinstance(e, OSError) and e.filename), None)
    folder = ", ".join(str(p) for p in removed) or written or str(run_dir)  # e.g. the logs, when they filled it
    need = ""
    if complete:
        manifest = read_manifest(complete[-1]) or {"files": {}}
        need = f"; a checkpoint takes {sum(f['size'] for f in manifest['files'].values()) / MIB:.2f} MiB"
    last = (f"the newest complete checkpoint {complete[-1]} is intact, and the same command run again resumes "
            f"from it" if complete else "no complete checkpoint yet: the same command run again starts over")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"disk full while writing {folder} (no space left on the device; the writer said: {first}): "
            f"{free / MIB:.1f} MiB free on the disk of {where} after "
            f"removing the partial folder{need}. {last[0].upper() + last[1:]}. Free space, keep fewer checkpoints "
            f"(--set keep_checkpoints=1), or point --output-dir at a larger disk.")


def export_disk_full_message(exc: BaseException, output_dir: Path, gguf_dir: Path) -> str:
    """The export ran out of space: its temporary folders are already gone (training/export/ removes them)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    frees = {}
    for path in (output_dir, gguf_dir):
        free, where = free_bytes(path)
        frees[str(where)] = free
    listed = ", ".join(f"{free / MIB:,.1f} MiB free on the disk of {where}" for where, free in frees.items())
    return (f"disk full during the export (no space left on the device; the writer said: {first}): the partial "
            f"merged model / GGUF folders were removed, the adapter and earlier exports are intact; {listed}. Free "
            f"space, or point --gguf-dir (and --output-dir for the merged model) at a larger disk, then run the "
            f"same command again.")
