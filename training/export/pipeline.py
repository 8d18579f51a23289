"""export(): one run, in phases: prepare (inputs, base, RAM/disk, converter; nothing loaded), merge (or reuse),
then either the merged model's report or the GGUF, checked, put in place only when every check passed."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from training.export.checks import failed_checks_message
from training.export.converter import default_converter_dir, fetch_converter, require_llama_cpp
from training.export.errors import CheckFailed, ExportError
from training.export.gguf import SCRATCH, gguf_export, remove_stale_tmp
from training.export.merge import merge_or_reuse, replace_dir, reusable_merge
from training.export.quants import GIB, QUANTS
from training.export.resources import check_resources, folder_bytes
from training.export.run import find_run, merge_dtype_name, read_json, resolve_base, safetensors_param_count
from training.jsonio import write_json_atomic
from training.runfiles import EXPORT_FAILED_REPORT, EXPORT_REPORT, MERGED_DIR

if TYPE_CHECKING:
    from training.export.cli import ExportOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What the export works on, all checked before anything is loaded."""

    quant: str | None  # None: --format merged
    run_dir: Path
    base_name: str
    base_path: Path
    dtype: str  # the merge precision
    merged_dir: Path
    reuse: dict | None  # the merge info of a reusable earlier merge
    resources: dict
    converter: Path | None


def export(opts: ExportOptions) -> dict:
    """Merge the run's adapter into its base and, for --format gguf, convert, check and place the GGUF; the report."""
    t_start = time.time()
    timings: dict[str, float] = {}
    prep = prepare(opts)
    t0 = time.time()
    merge_info = merge_or_reuse(prep.run_dir, prep.base_name, prep.base_path, prep.dtype, prep.merged_dir,
                                prep.reuse, compare_trained=opts.compare_trained)
    timings["merge_s"] = round(time.time() - t0, 2)
    report = {"run": prep.run_dir.name, "format": opts.format, "quant": prep.quant, "created": time.time(),
              "base": prep.base_name, "base_path": str(prep.base_path), "resources": prep.resources,
              "merge": merge_info, "merged_dir": str(prep.merged_dir), "merged_bytes": folder_bytes(prep.merged_dir)}
    if not prep.quant:
        report.update(timings={**timings, "total_s": round(time.time() - t_start, 2)}, passed=True)
        write_json_atomic(prep.merged_dir / EXPORT_REPORT, report)
        return report
    return export_gguf(prep, Path(opts.gguf_dir), report, timings, t_start)


def chosen_quant(opts: ExportOptions) -> str | None:
    """The GGUF type (lower case), None for --format merged; an unknown one or a missing llama-cpp-python refused."""
    if opts.format != "gguf":
        return None
    quant = opts.quant.lower()
    if quant not in QUANTS:
        raise ExportError(f"--quant {opts.quant}: unknown quantisation; choose one of {', '.join(QUANTS)} "
                          "(q8_0: near-lossless, half of bf16; q4_k_m: the usual small one for Ollama)")
    require_llama_cpp()
    return quant


def prepare(opts: ExportOptions) -> Prepared:
    """Every input checked and the machine's RAM and disk measured against the export, before anything is loaded."""
    quant = chosen_quant(opts)
    run_dir = find_run(Path(opts.output_dir), opts.run)
    base_name, base_path = resolve_base(run_dir, opts.base, opts.allow_other_base)
    dtype = merge_dtype_name(base_path, opts.dtype)
    merged_dir = run_dir / MERGED_DIR
    reuse = None if opts.force_merge else reusable_merge(merged_dir, run_dir, base_path, dtype)
    params = safetensors_param_count(base_path)
    plan = check_resources(params, dtype, quant, merged_dir, Path(opts.gguf_dir), reuse is not None,
                           int(read_json(base_path / "config.json").get("vocab_size") or 0))
    log.info("run %s: base %s (%s, %.3gB parameters) merged in %s; needs ~%.1f GiB RAM", run_dir.name, base_name,
             base_path, params / 1e9, dtype, plan["ram_needed_bytes"] / GIB)
    from training.console import quiet_libraries

    quiet_libraries()
    converter = None
    if quant:  # fail on a missing converter now, not after the merge
        converter = fetch_converter(opts.converter_dir or default_converter_dir(), opts.converter_sdist)
    return Prepared(quant, run_dir, base_name, base_path, dtype, merged_dir, reuse, plan, converter)


def export_gguf(prep: Prepared, gguf_root: Path, report: dict, timings: dict, t_start: float) -> dict:
    """The GGUF in a work folder gguf_root/.tmp-NAME-PID, renamed to gguf_root/NAME when every check passed; a
    failed check leaves its report in the run folder and nothing in gguf_root."""
    name = f"{prep.run_dir.name}-{prep.quant}"
    remove_stale_tmp(gguf_root)
    work = gguf_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    failed_report = prep.run_dir / EXPORT_FAILED_REPORT.format(quant=prep.quant)
    try:
        report.update(gguf_export(prep.converter, prep.merged_dir, work, name, prep.quant, timings))
        report["timings"] = {**timings, "total_s": round(time.time() - t_start, 2)}
        report["passed"] = all(c["passed"] for c in report["checks"].values())
        write_json_atomic(work / EXPORT_REPORT, report)
        if not report["passed"]:
            write_json_atomic(failed_report, report)  # the evidence stays, outside the GGUF folder
            raise CheckFailed(failed_checks_message(report["checks"], failed_report))
        for extra in SCRATCH:
            (work / extra).unlink(missing_ok=True)
        report["gguf_dir"] = str(gguf_root / name)
        write_json_atomic(work / EXPORT_REPORT, report)
        replace_dir(work, gguf_root / name)
        failed_report.unlink(missing_ok=True)  # an older failure is history
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report
