"""The GGUF: the merged model's reference logits, llama.cpp's converter (then its quantiser for k-quants), the
checks of the file in the worker process, and the Modelfile, all in a work folder that becomes the GGUF folder only
when every check passed."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from training.export.checks import (check_prompts, evaluate_checks, expected_tensor_count, load_causal_lm,
                                    prompt_logits)
from training.export.converter import CONVERTER_INFO, llama_cpp_version
from training.export.errors import CheckFailed
from training.export.merge import wants_bos
from training.export.modelfile import write_modelfile
from training.export.quants import QUANTS
from training.export.resources import available_ram_bytes, ram_needed_bytes
from training.export.run import merge_dtype_name, read_json, safetensors_param_count

log = logging.getLogger(__name__)

JOB, RESULT = "worker_job.json", "worker_result.json"  # the worker's input and output
REFERENCE = "reference_logits.npz"  # the merged model's logits on the check prompts, for the worker
INTERMEDIATE = "intermediate.gguf"  # the converter's lossless file, before k-quantisation
SCRATCH = (REFERENCE, JOB, RESULT, INTERMEDIATE)  # removed from the work folder before it becomes the GGUF folder


def gguf_export(converter: Path, merged_dir: Path, work: Path, name: str, quant: str, timings: dict) -> dict:
    """merged_dir -> work/NAME.gguf + Modelfile, checked against the merged model; the report's GGUF part."""
    from transformers import AutoTokenizer

    config = read_json(merged_dir / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    texts, ids = check_prompts(tokenizer)
    ref_dtype = write_reference_logits(merged_dir, ids, work, timings)
    gguf_path = work / f"{name}.gguf"
    convert_and_quantize(converter, merged_dir, gguf_path, quant, timings)

    t0 = time.time()
    log.info("checking the GGUF against the merged model ...")
    res = run_worker({"task": "check", "gguf": str(gguf_path), "converter": str(converter), "texts": texts,
                      "ids": ids, "reference": str(work / REFERENCE)}, work)
    expected = {"config": config, "arch": config.get("model_type"), "tensors": expected_tensor_count(merged_dir),
                "chat_template": tokenizer.chat_template, "reference_dtype": ref_dtype,
                "adds_bos": wants_bos(tokenizer)}
    checks = evaluate_checks(res, expected, quant)
    timings["check_s"] = round(time.time() - t0, 2)
    c = checks["logits_vs_merged"]
    log.info("GGUF %s vs merged model over %d positions: top-1 agreement %.3f (limit %.2f), max logit diff %.3g = "
             "%.3g sd (limit %.3g sd)", quant, c["positions"], c["top1_agreement"], c["limit_top1"],
             c["max_logit_diff"], c["max_logit_diff_sd"], c["limit_max_logit_diff_sd"])
    modelfile = write_modelfile(work, gguf_path.name, config, tokenizer)
    return {"gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size, "modelfile": modelfile,
            "converter": read_json(converter / CONVERTER_INFO), "llama_cpp_python": llama_cpp_version(),
            "checks": checks}


def write_reference_logits(merged_dir: Path, ids: list[list[int]], work: Path, timings: dict) -> str:
    """The saved merged model's logits on the check prompts into work/reference_logits.npz, computed in float32 when
    it fits (a bf16 reference adds its own rounding); returns the precision used."""
    import numpy as np

    dtype = merge_dtype_name(merged_dir, "auto")
    params = safetensors_param_count(merged_dir)
    ref_dtype = "float32" if ram_needed_bytes(params * 4) < available_ram_bytes()[0] else dtype
    t0 = time.time()
    model = load_causal_lm(merged_dir, ref_dtype)
    ref = prompt_logits(model, ids)
    del model
    gc.collect()
    np.savez(work / REFERENCE, **{f"p{i}": a for i, a in enumerate(ref)})
    timings["reference_s"] = round(time.time() - t0, 2)
    return ref_dtype


def convert_and_quantize(converter: Path, merged_dir: Path, gguf_path: Path, quant: str, timings: dict) -> None:
    """llama.cpp's converter writes the GGUF; for a k-quant it writes a lossless one that the quantiser then reads."""
    q = QUANTS[quant]
    work = gguf_path.parent
    t0 = time.time()
    first = work / INTERMEDIATE if q.ftype else gguf_path
    dtype = merge_dtype_name(merged_dir, "auto")
    outtype = q.outtype if q.outtype != "lossless" else ("f32" if dtype == "float32" else "bf16")
    log.info("converting to GGUF (%s) with %s ...", outtype, converter / "convert_hf_to_gguf.py")
    convert_to_gguf(converter, merged_dir, first, outtype, work / "convert.log")
    timings["convert_s"] = round(time.time() - t0, 2)
    if q.ftype:
        t0 = time.time()
        log.info("quantising to %s ...", quant)
        run_worker({"task": "quantize", "src": str(first), "dst": str(gguf_path), "ftype": q.ftype}, work)
        first.unlink()
        timings["quantize_s"] = round(time.time() - t0, 2)


def convert_to_gguf(converter: Path, merged_dir: Path, out: Path, outtype: str, log_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the converter's own gguf-py
    cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged_dir), "--outfile", str(out),
           "--outtype", outtype]
    with open(log_path, "a", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not out.is_file():
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
        raise CheckFailed(f"convert_hf_to_gguf.py failed (exit {proc.returncode}); last lines of {log_path.name}:\n"
                          f"{tail}")


def run_worker(job: dict, workdir: Path) -> dict:
    """llama.cpp's native code runs in a child process (training/export/worker.py): a crash there cannot leave this
    export half-done."""
    job_path, result_path = workdir / JOB, workdir / RESULT
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "training.export.worker", str(job_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise CheckFailed(f"llama.cpp step '{job['task']}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[2])  # the folder holding training/
    return os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def remove_stale_tmp(gguf_root: Path) -> None:
    """`.tmp-*` folders of exports whose process is gone (killed mid-way) are garbage."""
    if not gguf_root.is_dir():
        return
    for p in gguf_root.glob(".tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
