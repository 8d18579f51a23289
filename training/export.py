"""Ship a trained run: merge its LoRA adapter into the base, convert to GGUF for llama.cpp / Ollama, and prove that
the exported model says what the trained one says.

Usage:
    python -m training.export --run NAME                      # GGUF q8_0 + Modelfile in models/gguf/NAME-q8_0/
    python -m training.export --run NAME --quant q4_k_m       # smaller GGUF (f32|f16|bf16|q8_0|q4_k_m)
    python -m training.export --run NAME --format merged      # merged safetensors only, in outputs/NAME/merged/
    python -m training.export --fetch-converter               # once, with network: unpack llama.cpp's converter

Steps (each checked, every number in export_report.json):
  1. merge: the base reloaded in its own precision (bf16 for Gemma; never the 4-bit training weights, whose
     rounding would be baked in), the adapter applied and merged; the merged model's logits on fixed prompts
     must equal the adapter-on-base logits. Saved with the tokenizer files, the chat template and tokenizer.model.
  2. GGUF: llama.cpp's convert_hf_to_gguf.py from the pinned llama-cpp-python source, then llama.cpp's
     quantiser for k-quants.
  3. checks: metadata and tensor count against config.json, every tensor finite, chat template present, the
     same token ids from llama.cpp's tokenizer, then the fixed prompts through the merged model and the GGUF
     (llama-cpp-python): top-1 agreement and max logit difference within the limits of the quantisation type.
  4. an Ollama Modelfile (the run's chat template family: Gemma or ChatML, its stop tokens) beside the GGUF.
The GGUF folder is written under a temporary name and renamed only when every check passed.

Exit status: 0 exported and checked, 2 bad input (run, base, tokenizer files, RAM/disk, quantisation, converter),
3 a check failed (nothing is left in the GGUF folder), 1 a bug (with traceback).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/export.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.jsonl import write_json_atomic  # noqa: E402
from training.errors import UserError

log = logging.getLogger("training.export")

# The converter and gguf-py must come from the same llama.cpp as the runtime that quantises and checks the file.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# sha256 of the source packages the converter is unpacked from (as published on PyPI): a different file is refused
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
GIB = 2**30
MERGE_FORMAT = 2  # bump when what merge_adapter writes changes: an older merged/ folder is then merged again


@dataclass(frozen=True)
class Quant:
    outtype: str  # what convert_hf_to_gguf.py writes (--outtype); lossless: the merged model's own precision
    ftype: str | None  # llama.cpp ftype for llama_model_quantize (k-quants), None: the converter's output is final
    bytes_per_param: float  # for the disk estimate
    min_top1: float  # least share of positions where the GGUF's top token equals the merged model's
    max_diff_std: float  # largest |logit difference| allowed, in standard deviations of the reference's logits


# Limits. Logit differences are measured in units of the reference logits' standard deviation, so the same limit
# serves the tiny model (logits within +-1) and Gemma (+-30). Measured on the tiny model (float32 reference):
# f32 0.003 sd, q8_0 0.17 sd, q4_k_m 0.5 sd; the same merged model without its adapter is 5.7 sd away, with 1% of
# its top tokens equal. Top-1 agreement is loose: where the reference's two best tokens are within rounding of each
# other, either is what the model says (the tiny model's near-flat logits flip 2% at q8_0, 11% at q4_k_m).
QUANTS: dict[str, Quant] = {
    "f32": Quant("f32", None, 4.0, 0.98, 0.1),
    "f16": Quant("f16", None, 2.0, 0.95, 0.3),
    "bf16": Quant("bf16", None, 2.0, 0.95, 0.5),
    "q8_0": Quant("q8_0", None, 34 / 32, 0.90, 1.0),
    "q4_k_m": Quant("lossless", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9 / 8, 0.75, 2.5),  # quantised from a lossless file
}
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
# merged vs adapter-on-base (min top-1, max diff in sd): the same maths, one rounding of W + BA apart
MERGE_LIMITS = {"float32": (0.99, 1e-3), "bfloat16": (0.95, 0.5), "float16": (0.95, 0.5)}

# Fixed prompts, chat-formatted with the run's own template: the same token ids go through both models.
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "What is QLoRA, in one sentence?"}],
    [{"role": "user", "content": "Write a haiku about a GPU."},
     {"role": "assistant", "content": "Fans hum in the dark,\nmatrices bloom into light,\nthe loss curve bends down."},
     {"role": "user", "content": "Now one about checkpoints."}],
    [{"role": "user", "content": "Translate to French: the cat sleeps on the warm laptop."}],
    [{"role": "user", "content": "List three prime numbers greater than 100, then explain why 2 is prime."}],
]


class ExportError(UserError):
    """Bad input or an unfit machine: the message says what, where and what to do. Exit 2, no traceback."""


class CheckFailed(Exception):
    """The exported model does not say what the trained one says. Exit 3; nothing is left in the GGUF folder."""


# ------------------------------------------------------------------------------------------------------- the run
def find_run(output_dir: Path, run: str | None, verb: str = "export") -> Path:
    """The run folder with a saved adapter; without --run, the newest one (`verb`: the make verb, for the hint)."""
    if run:
        run_dir = output_dir / run
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            known = ", ".join(sorted(p.parent.parent.name for p in output_dir.glob("*/adapter/adapter_config.json")))
            what = "has no adapter/ (training did not finish?)" if run_dir.is_dir() else "does not exist"
            raise ExportError(f"run '{run}': {run_dir} {what}.\n-> runs with an adapter in {output_dir}: "
                              f"{known or 'none'}; pass RUN=<one of them> (make {verb}) or --run NAME")
        return run_dir
    found = sorted(output_dir.glob("*/adapter/adapter_config.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ExportError(f"no run with an adapter in {output_dir}/.\n-> train one first (make demo), or point "
                          "--output-dir at the folder holding your runs")
    return found[-1].parent.parent


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}\n-> the file is damaged; re-run training or fix it") from None


def resolve_base(run_dir: Path, base_arg: str | None, allow_other_base: bool) -> tuple[str, Path]:
    """The base the adapter was trained on, as a name and a local folder; refuse a --base it was not trained on."""
    from training.tiny import resolve_builtin

    adapter_cfg = read_json(run_dir / "adapter" / "adapter_config.json")
    summary = read_json(run_dir / "run_summary.json")
    trained_on = adapter_cfg.get("base_model_name_or_path") or summary.get("base_model_path") or ""
    name = base_arg or summary.get("config", {}).get("model_name_or_path") or trained_on
    if not name:
        raise ExportError(f"{run_dir}: neither run_summary.json nor adapter/adapter_config.json names the base "
                          "model.\n-> pass --base ID_OR_PATH (the model this adapter was trained on)")
    try:
        local = resolve_builtin(name)
    except ValueError as exc:
        raise ExportError(f"--base {name}: {exc}") from None
    path = Path(local)
    if not path.is_dir():
        path = _download_base(local)
    if trained_on and not _same_base(trained_on, path) and not allow_other_base:
        raise ExportError(
            f"the adapter in {run_dir / 'adapter'} was trained on '{trained_on}' "
            f"(adapter_config.json base_model_name_or_path), not on '{name}' ({path}).\n-> pass --base {trained_on} "
            "(or omit --base), or add --allow-other-base if that folder is a copy of the same weights")
    return name, path


def _same_base(trained_on: str, path: Path) -> bool:
    if Path(trained_on).is_dir():
        return Path(trained_on).resolve() == path.resolve()
    # a hub id matches its own Hugging Face cache snapshot (models--ORG--NAME/snapshots/HASH)
    return f"models--{trained_on.replace('/', '--')}" in path.resolve().parts


def _download_base(repo_id: str) -> Path:
    """A hub id: its files from the Hugging Face cache (downloaded once; HF_TOKEN for gated models)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model",
                                                               "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; all mean the same to the user here
        from training.model_check import explain_load_error

        raise ExportError(explain_load_error(repo_id, exc)) from None


def safetensors_param_count(folder: Path) -> int:
    """Parameters of a safetensors model from the file headers alone (nothing is loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} has no *.safetensors weights.\n-> point --base at a Hugging Face model folder "
                          "with safetensors weights (config.json + model*.safetensors)")
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


def merge_dtype_name(base: Path, asked: str) -> str:
    """The precision to merge in: the base checkpoint's own (bf16 for Gemma, float32 for the tiny model)."""
    if asked != "auto":
        return {"bf16": "bfloat16", "f32": "float32", "f16": "float16"}[asked]
    cfg = read_json(base / "config.json")
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return dtype if dtype in DTYPES else "bfloat16"


# ------------------------------------------------------------------------------------------------- resources
def available_ram_bytes() -> tuple[int, str]:
    """Free memory for this process: the smaller of the host's available RAM and a container (cgroup) limit."""
    import psutil

    avail, where = psutil.virtual_memory().available, "host RAM available"
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60 and int(limit) - usage < avail:
            avail, where = int(limit) - usage, f"container memory limit ({limit_file})"
        break
    return avail, where


def check_resources(params: int, dtype: str, quant: str | None, merged_dir: Path, gguf_dir: Path,
                    reuse_merged: bool, vocab_size: int = 0) -> dict:
    """Refuse before loading anything when RAM or disk cannot hold the export; say how much is needed."""
    model_bytes = params * DTYPES[dtype]
    # one copy of the model, a safetensors shard being written, and ~1.5 GiB for torch/transformers themselves
    need_ram = int(model_bytes * 1.2 + 1.5 * GIB)
    have_ram, ram_where = available_ram_bytes()
    plan = {"parameters": params, "merge_dtype": dtype, "model_bytes": model_bytes, "ram_needed_bytes": need_ram,
            "ram_available_bytes": have_ram}
    if need_ram > have_ram:
        raise ExportError(
            f"not enough memory: merging {params / 1e9:.2f}B parameters in {dtype} needs about "
            f"{need_ram / GIB:.1f} GiB, {ram_where}: {have_ram / GIB:.1f} GiB.\n-> close other programs (a training "
            "run?), raise the container's memory limit, or run the export on a machine with more RAM")
    disk: dict[int, list] = {}  # st_dev -> [bytes needed, a path on it]

    def need(path: Path, nbytes: int) -> None:
        probe = path
        while not probe.exists():
            probe = probe.parent
        entry = disk.setdefault(probe.stat().st_dev, [0, probe])
        entry[0] += nbytes

    if not reuse_merged:
        need(merged_dir, int(model_bytes * 1.02) + 50 * 2**20)  # two copies briefly: the new one, then the rename
    if quant:
        q = QUANTS[quant]
        out = params * q.bytes_per_param
        tmp = params * DTYPES[dtype] if q.ftype else 0  # the converter's lossless file, then quantised
        ref = 512 * vocab_size * 4  # the reference logits of the check prompts (< 512 positions), float32
        need(gguf_dir, int(out + tmp + ref) + 50 * 2**20)
    plan["disk"] = []
    for nbytes, path in disk.values():
        free = shutil.disk_usage(path).free
        plan["disk"].append({"path": str(path), "needed_bytes": nbytes, "free_bytes": free})
        if nbytes > free:
            raise ExportError(f"not enough disk space on {path}: the export needs about {nbytes / GIB:.2f} GiB, "
                              f"{free / GIB:.2f} GiB is free.\n-> free space there, or point --gguf-dir / "
                              "--output-dir at a larger disk")
    return plan


# ------------------------------------------------------------------------------------------------- converter
def default_converter_dir() -> Path:
    return Path(os.environ.get("LLAMA_CPP_CONVERTER_DIR",
                               f"models/converters/llama-cpp-python-{llama_cpp_version() or LLAMA_CPP_PYTHON_VERSION}"))


def llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def converter_ready(folder: Path) -> bool:
    return (folder / "converter_info.json").is_file() and (folder / "convert_hf_to_gguf.py").is_file()


def fetch_converter(folder: Path, sdist: Path | None = None) -> Path:
    """Unpack convert_hf_to_gguf.py, its conversion/ package and gguf-py/ from the llama-cpp-python source package
    of the installed version (the wheel does not carry them; PyPI's `gguf` is too old for this converter)."""
    if converter_ready(folder):
        return folder
    ver = llama_cpp_version() or LLAMA_CPP_PYTHON_VERSION
    if sdist is not None and not (sdist.is_file() and tarfile.is_tarfile(sdist)):
        raise ExportError(f"--converter-sdist {sdist}: not a readable .tar.gz.\n-> pip download --no-binary "
                          f"llama-cpp-python --no-deps llama-cpp-python=={ver} -d DIR, then pass "
                          f"DIR/llama_cpp_python-{ver}.tar.gz")
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as td:
        if sdist is None:
            log.info("fetching llama-cpp-python %s source (~75 MB, once) for llama.cpp's converter", ver)
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python",
                                   "--no-deps", "--quiet", f"llama-cpp-python=={ver}", "-d", td],
                                  capture_output=True, text=True)
            found = list(Path(td).glob("llama_cpp_python-*.tar.gz"))
            if proc.returncode != 0 or not found:
                raise ExportError(
                    f"cannot download the llama-cpp-python {ver} source package for the GGUF converter: "
                    f"{(proc.stderr.strip().splitlines() or ['pip failed'])[-1]}\n-> run `python -m training.export "
                    "--fetch-converter` once with network access, or pass --converter-sdist PATH to a "
                    f"llama_cpp_python-{ver}.tar.gz, or set LLAMA_CPP_CONVERTER_DIR to an unpacked converter")
            sdist = found[0]
        digest = _sha256(sdist)
        if ver in SDIST_SHA256 and digest != SDIST_SHA256[ver]:
            raise ExportError(f"{sdist}: sha256 {digest} is not the published llama-cpp-python {ver} source package "
                              f"({SDIST_SHA256[ver]}).\n-> download it again from PyPI (pip download --no-binary "
                              f"llama-cpp-python --no-deps llama-cpp-python=={ver})")
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        prefix = None
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/vendor/llama.cpp/", 1)
                if len(parts) != 2 or not member.isfile():
                    continue
                rel = parts[1]
                if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in CONVERTER_MEMBERS):
                    prefix = parts[0]
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        if not (tmp / "convert_hf_to_gguf.py").is_file() or not (tmp / "gguf-py" / "gguf").is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(f"{sdist} does not contain vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py/.\n-> use "
                              f"the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source package (.tar.gz)")
        write_json_atomic(tmp / "converter_info.json", {"llama_cpp_python": ver, "source": prefix,
                                                        "sdist_sha256": digest})
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    log.info("converter ready in %s", folder)
    return folder


def _sha256(path: Path) -> str:
    from training.checkpoints import sha256_file

    return sha256_file(path)[1]


def require_llama_cpp() -> str:
    ver = llama_cpp_version()
    if ver is None:
        raise ExportError(
            "GGUF export needs llama-cpp-python (to quantise and to check the file), and it is not installed.\n-> "
            f"CMAKE_ARGS=-DGGML_NATIVE=OFF pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}' requests "
            "(or pip install -e '.[export]'; it compiles for ~5 minutes), or use --format merged")
    return ver


# ------------------------------------------------------------------------------------------------------ merge
def load_causal_lm(path: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    # eager attention keeps Gemma-2's attention logit soft-capping, which llama.cpp implements too
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), attn_implementation="eager",
                                                 device_map={"": "cpu"})
    return model.eval()


def check_prompts(tokenizer) -> tuple[list[str], list[list[int]]]:
    """The fixed conversations as text (chat template applied) and as the HF tokenizer's ids."""
    texts, ids = [], []
    for conv in CHECK_CONVERSATIONS:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        texts.append(text)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return texts, ids


def prompt_logits(model, ids: list[list[int]]):
    import torch

    out = []
    with torch.inference_mode():
        for seq in ids:
            logits = model(input_ids=torch.tensor([seq])).logits[0]
            out.append(logits.float().numpy())
    return out


def compare_logits(ref: list, other: list) -> dict:
    """Top-1 agreement and max |difference| over every position and vocabulary entry; the difference also in
    standard deviations of the reference logits (scale-free)."""
    import numpy as np

    positions = agree = 0
    max_diff = 0.0
    for a, b in zip(ref, other):
        n = min(a.shape[-1], b.shape[-1])
        a, b = a[:, :n], b[:, :n]
        positions += a.shape[0]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        max_diff = max(max_diff, float(np.abs(a - b).max()))
    std = float(np.concatenate([a.reshape(-1) for a in ref]).std()) or 1.0
    return {"positions": positions, "top1_agreement": agree / max(positions, 1), "max_logit_diff": max_diff,
            "reference_logit_std": std, "max_logit_diff_sd": max_diff / std}


def within(cmp: dict, min_top1: float, max_diff_std: float) -> dict:
    return {**cmp, "limit_top1": min_top1, "limit_max_logit_diff_sd": max_diff_std,
            "passed": cmp["top1_agreement"] >= min_top1 and cmp["max_logit_diff_sd"] <= max_diff_std}


def adapter_fingerprint(adapter_dir: Path) -> str:
    return _sha256(adapter_dir / "adapter_model.safetensors")


def merge_adapter(run_dir: Path, base_name: str, base_path: Path, dtype: str, merged_dir: Path,
                  compare_trained: bool = True) -> dict:
    """Base in `dtype` + adapter -> merged model in merged_dir (temp folder, renamed when saved and checked)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir = run_dir / "adapter"
    # llama.cpp's converter reads a SentencePiece model (Gemma) from tokenizer.model, a BPE one (Llama 3, SmolLM2,
    # Qwen...) from tokenizer.json
    spm = next((p for p in (adapter_dir / "tokenizer.model", base_path / "tokenizer.model") if p.is_file()), None)
    if spm is None and sentencepiece_family(base_path):
        raise ExportError(f"no tokenizer.model in {adapter_dir} or {base_path}: GGUF conversion of this "
                          f"SentencePiece model ({read_json(base_path / 'config.json').get('model_type')}) needs the "
                          "SentencePiece file.\n-> copy tokenizer.model from the base model's files (the Hugging Face "
                          f"repo of {base_name}) into {adapter_dir}/")
    if spm is None and not (adapter_dir / "tokenizer.json").is_file():
        raise ExportError(f"{adapter_dir} has neither tokenizer.model nor tokenizer.json: GGUF conversion needs the "
                          "tokenizer's files.\n-> re-save the base model's tokenizer into that folder")
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if not tokenizer.chat_template:
        raise ExportError(f"{adapter_dir} has no chat template (chat_template.jinja / tokenizer_config.json).\n-> "
                          "re-save the tokenizer of the base model with its chat template into that folder")
    texts, ids = check_prompts(tokenizer)
    base = load_causal_lm(base_path, dtype)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the adapter in {adapter_dir} does not fit the base {base_path}: {first[:300]}\n-> pass "
                          "--base with the model the run was trained on (run_summary.json: config."
                          "model_name_or_path)") from None
    model.eval()
    adapter_logits = prompt_logits(model, ids)
    merged = model.merge_and_unload()
    tmp = merged_dir.with_name(f".{merged_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_added_tokens_decoder(tokenizer, tmp / "tokenizer_config.json")
        if spm is not None:
            shutil.copyfile(spm, tmp / "tokenizer.model")
        del model, merged, base
        gc.collect()
        t_merge = time.time() - t0
        # the saved files, reloaded, must say what adapter-on-base said
        reloaded = load_causal_lm(tmp, dtype)
        merged_logits = prompt_logits(reloaded, ids)
        del reloaded
        gc.collect()
        cmp = within(compare_logits(adapter_logits, merged_logits), *MERGE_LIMITS[dtype])
        info = {"merge_format": MERGE_FORMAT, "base": base_name, "base_path": str(base_path.resolve()), "dtype": dtype,
                "adapter_sha256": adapter_fingerprint(adapter_dir), "merged_vs_adapter_on_base": cmp,
                "merge_seconds": round(t_merge, 2)}
        if not cmp["passed"]:
            raise CheckFailed(f"the merged model does not say what adapter-on-base says: top-1 agreement "
                              f"{cmp['top1_agreement']:.3f} (limit {cmp['limit_top1']}), max logit difference "
                              f"{cmp['max_logit_diff_sd']:.3g} sd (limit {cmp['limit_max_logit_diff_sd']})")
        if compare_trained:
            info["merged_vs_trained_4bit"] = compare_with_trained(run_dir, base_path, ids, merged_logits)
        info["check_seconds"] = round(time.time() - t0 - t_merge, 2)
        write_json_atomic(tmp / "merge_info.json", info)  # written last: its presence means a complete merge
        _replace_dir(tmp, merged_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def compare_with_trained(run_dir: Path, base_path: Path, ids: list[list[int]], merged_logits: list) -> dict:
    """Informational: the model as trained (base in 4-bit with the run's settings + adapter) vs the merged one.
    The difference is the NF4 rounding of the base that the export leaves out; it has no limit."""
    import torch

    cfg = read_json(run_dir / "run_summary.json").get("config", {})
    if cfg.get("load_in_4bit") is False:
        return {"skipped": "the run did not train on a 4-bit base"}
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.get("bnb_4bit_quant_type", "nf4"),
                                   bnb_4bit_use_double_quant=cfg.get("bnb_4bit_use_double_quant", True),
                                   bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(str(base_path), quantization_config=quant, dtype=torch.float32,
                                                    attn_implementation="eager", device_map={"": "cpu"})
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
        trained = prompt_logits(model, ids)
        del model, base
        gc.collect()
    except Exception as exc:  # noqa: BLE001 - informational only: say why and go on
        return {"skipped": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    return {**compare_logits(trained, merged_logits), "note": "informational, no limit: NF4 rounding of the base"}


def write_added_tokens_decoder(tokenizer, config_path: Path) -> None:
    """transformers 5 no longer writes `added_tokens_decoder` nor `add_bos_token` into tokenizer_config.json, and
    llama.cpp's converter reads them: without the first, <start_of_turn>/<end_of_turn> become plain text pieces in
    the GGUF and llama.cpp / Ollama split them into characters; the second says whether llama.cpp adds <bos>
    (Ollama's templates leave it to the runtime). Write both back from the tokenizer's actual behaviour."""
    cfg = read_json(config_path)
    if not cfg.get("added_tokens_decoder"):
        special = set(tokenizer.all_special_tokens)
        cfg["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": bool(t.special or t.content in special)}
            for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    probe = tokenizer("a")["input_ids"]
    cfg.setdefault("add_bos_token", wants_bos(tokenizer))
    cfg.setdefault("add_eos_token", bool(probe) and probe[-1] == tokenizer.eos_token_id)
    write_json_atomic(config_path, cfg)


def wants_bos(tokenizer) -> bool:
    """Whether prompts start with <bos>: the tokenizer adds it, or the chat template writes it (Gemma's does; Ollama's
    Go template does not, so the GGUF must tell llama.cpp to add it)."""
    if tokenizer.bos_token_id is None:
        return False
    if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return True
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                             tokenize=False)
    # ChatML's <|im_start|> is SmolLM2's bos_token but opens every turn: Ollama's template writes it, llama.cpp must not
    return rendered.startswith(tokenizer.bos_token) and rendered.count(tokenizer.bos_token) == 1


def reusable_merge(merged_dir: Path, run_dir: Path, base_path: Path, dtype: str) -> dict | None:
    """A complete earlier merge of the same adapter, base and precision (exporting another quant reuses it)."""
    info = read_json(merged_dir / "merge_info.json") if (merged_dir / "merge_info.json").is_file() else {}
    if (info.get("merge_format") == MERGE_FORMAT and info.get("dtype") == dtype
            and info.get("base_path") == str(base_path.resolve())
            and info.get("adapter_sha256") == adapter_fingerprint(run_dir / "adapter")
            and info.get("merged_vs_adapter_on_base", {}).get("passed")):
        return info
    return None


def _replace_dir(tmp: Path, target: Path) -> None:
    """Put a finished folder in place; an older one is renamed away first, then deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".trash-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- GGUF
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
    """llama.cpp's native code runs in a child process: a crash there cannot leave this export half-done."""
    job_path, result_path = workdir / "worker_job.json", workdir / "worker_result.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "training.export", "--worker", str(job_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise CheckFailed(f"llama.cpp step '{job['task']}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def worker_main(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    result = {"quantize": _worker_quantize, "check": _worker_check}[job["task"]](job)
    write_json_atomic(job_path.with_name("worker_result.json"), result)
    return 0


def _worker_quantize(job: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, job["ftype"])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    return {"rc": rc}


def _worker_check(job: dict) -> dict:
    """Metadata, tensors, tokenizer and logits of the GGUF file (runs in the worker process)."""
    import numpy as np

    sys.path.insert(0, str(Path(job["converter"]) / "gguf-py"))
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(job["gguf"])

    def field(key):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    meta = {"general.architecture": arch, "general.file_type": field("general.file_type")}
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "context_length"):
        meta[f"{arch}.{key}"] = field(f"{arch}.{key}")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    meta["vocab_size"] = len(tokens.data) if tokens is not None else None
    meta["tokenizer.ggml.model"] = field("tokenizer.ggml.model")
    chat_template = field("tokenizer.chat_template")
    nonfinite, types = [], {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        data = np.asarray(t.data)
        rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
        for start in range(0, rows.shape[0], 4096):  # bounded memory for large embeddings
            block = dequantize(rows[start:start + 4096], t.tensor_type)
            if not np.isfinite(block).all():
                nonfinite.append(t.name)
                break
    layers = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    result = {"metadata": meta, "tensor_count": len(reader.tensors), "tensor_types": types,
              "layers_with_tensors": len(layers), "nonfinite_tensors": nonfinite,
              "chat_template_in_gguf": chat_template}

    import llama_cpp

    ref = np.load(job["reference"])
    n_ctx = max(len(ids) for ids in job["ids"]) + 8
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_gpu_layers=0, n_threads=os.cpu_count() or 1, seed=0, verbose=False)
    token_mismatch, logits = [], []
    for i, (text, ids) in enumerate(zip(job["texts"], job["ids"])):
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if list(got) != list(ids):
            token_mismatch.append({"prompt": i, "llama_cpp": list(got)[:40], "hf": list(ids)[:40]})
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
    result["n_vocab_llama_cpp"] = llm.n_vocab()
    result["bos_added_by_llama_cpp"] = llm.tokenize(b"a", add_bos=True, special=False)[:1] == [llm.token_bos()]
    llm.close()
    result["tokenizer_mismatches"] = token_mismatch
    result["logits"] = compare_logits([ref[f"p{i}"] for i in range(len(job["ids"]))], logits)
    return result


def evaluate_checks(res: dict, expected: dict, quant: str) -> dict:
    """Turn the worker's measurements into named pass/fail checks."""
    q = QUANTS[quant]
    meta, cfg = res["metadata"], expected["config"]
    arch = meta["general.architecture"]
    want = {f"{arch}.block_count": cfg.get("num_hidden_layers"), f"{arch}.embedding_length": cfg.get("hidden_size"),
            f"{arch}.feed_forward_length": cfg.get("intermediate_size"),
            f"{arch}.attention.head_count": cfg.get("num_attention_heads"),
            f"{arch}.attention.head_count_kv": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
            f"{arch}.context_length": cfg.get("max_position_embeddings"), "vocab_size": cfg.get("vocab_size")}
    wrong = {k: {"gguf": meta.get(k), "config": v} for k, v in want.items() if v is not None and meta.get(k) != v}
    logits = res["logits"]
    checks = {
        "metadata": {"passed": not wrong and arch == expected["arch"], "architecture": arch,
                     "expected_architecture": expected["arch"], "mismatches": wrong},
        "tensor_count": {"passed": res["tensor_count"] == expected["tensors"]
                         and res["layers_with_tensors"] == cfg.get("num_hidden_layers"),
                         "gguf": res["tensor_count"], "expected": expected["tensors"],
                         "layers": res["layers_with_tensors"], "types": res["tensor_types"]},
        "tensors_finite": {"passed": not res["nonfinite_tensors"], "nonfinite": res["nonfinite_tensors"]},
        "chat_template": {"passed": (res["chat_template_in_gguf"] or "").strip() == expected["chat_template"].strip()},
        "tokenizer": {"passed": not res["tokenizer_mismatches"] and res["n_vocab_llama_cpp"] == cfg.get("vocab_size")
                      and res["bos_added_by_llama_cpp"] == expected["adds_bos"],
                      "n_vocab": res["n_vocab_llama_cpp"], "mismatches": res["tokenizer_mismatches"],
                      "bos_added_by_llama_cpp": res["bos_added_by_llama_cpp"], "bos_added_by_hf": expected["adds_bos"]},
        "logits_vs_merged": {**within(logits, q.min_top1, q.max_diff_std),
                             "reference_dtype": expected["reference_dtype"]},
    }
    return checks


def describe_check(name: str, c: dict) -> str:
    """One line for a failed check."""
    if name == "logits_vs_merged":
        return (f"top-1 agreement {c['top1_agreement']:.3f} (limit {c['limit_top1']}), max logit diff "
                f"{c['max_logit_diff_sd']:.3g} sd (limit {c['limit_max_logit_diff_sd']} sd)")
    if name == "metadata":
        return f"architecture {c['architecture']} (expected {c['expected_architecture']}), differing: {c['mismatches']}"
    if name == "tensor_count":
        return f"{c['gguf']} tensors in {c['layers']} layers, expected {c['expected']}"
    if name == "tensors_finite":
        return f"NaN/inf in {', '.join(c['nonfinite'][:5])}"
    if name == "chat_template":
        return "the GGUF's tokenizer.chat_template is missing or differs from the run's"
    if name == "tokenizer":
        return (f"{len(c['mismatches'])} prompt(s) tokenized differently by llama.cpp, n_vocab {c['n_vocab']}, "
                f"<bos> added by llama.cpp {c['bos_added_by_llama_cpp']} vs expected {c['bos_added_by_hf']}")
    return json.dumps(c, default=str)[:300]


def expected_tensor_count(merged_dir: Path, config: dict) -> int:
    """One GGUF tensor per safetensors tensor (llama-family / Gemma converters map 1:1); a tied lm_head is skipped."""
    count = 0
    for f in merged_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        count += sum(1 for k in header if k != "__metadata__" and k != "lm_head.weight")
    return count


# ------------------------------------------------------------------------------------------------ Modelfile
def sentencepiece_family(base_path: Path) -> bool:
    """Gemma's tokenizer is SentencePiece: its GGUF needs tokenizer.model, which transformers 5 does not save."""
    return str(read_json(base_path / "config.json").get("model_type", "")).startswith("gemma")


def modelfile_text(gguf_name: str, num_ctx: int, family: str | None = "gemma", system: str | None = None) -> str:
    """Ollama's Modelfile in the run's template family (training/templates.py), with the template's default system
    prompt (ChatML models such as SmolLM2 have one)."""
    from training.templates import OLLAMA_STOPS, OLLAMA_TEMPLATES

    lines = ["# Ollama: ollama create NAME -f Modelfile   (written by python -m training.export)",
             f"FROM ./{gguf_name}"]
    if family is not None:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[family]}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in OLLAMA_STOPS.get(family, ())]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict:
    """The FROM / TEMPLATE / PARAMETER instructions of a Modelfile (Ollama's syntax, the subset we write)."""
    out: dict = {"from": None, "template": None, "system": None, "parameters": []}
    i, lines = 0, text.splitlines()
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        cmd, _, rest = line.partition(" ")
        cmd = cmd.upper()
        if cmd in ("TEMPLATE", "SYSTEM") and rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise ValueError(f"{cmd}: unterminated triple-quoted string")
                body += "\n" + lines[i]
                i += 1
            out[cmd.lower()] = body[:body.index('"""')]
        elif cmd == "FROM":
            out["from"] = rest.strip()
        elif cmd == "PARAMETER":
            key, _, value = rest.strip().partition(" ")
            value = value.strip()
            out["parameters"].append((key, json.loads(value) if value.startswith('"') else value))
        else:
            raise ValueError(f"unknown Modelfile instruction {cmd!r}")
    return out


# ------------------------------------------------------------------------------------------------------- main
def export(args) -> dict:
    t_start = time.time()
    timings: dict[str, float] = {}
    output_dir, gguf_root = Path(args.output_dir), Path(args.gguf_dir)
    quant = None
    if args.format == "gguf":
        quant = args.quant.lower()
        if quant not in QUANTS:
            raise ExportError(f"--quant {args.quant}: unknown quantisation; choose one of {', '.join(QUANTS)} "
                              "(q8_0: near-lossless, half of bf16; q4_k_m: the usual small one for Ollama)")
        require_llama_cpp()
    run_dir = find_run(output_dir, args.run)
    run = run_dir.name
    base_name, base_path = resolve_base(run_dir, args.base, args.allow_other_base)
    dtype = merge_dtype_name(base_path, args.dtype)
    merged_dir = run_dir / "merged"
    reuse = None if args.force_merge else reusable_merge(merged_dir, run_dir, base_path, dtype)
    params = safetensors_param_count(base_path)
    plan = check_resources(params, dtype, quant, merged_dir, gguf_root, reuse is not None,
                           int(read_json(base_path / "config.json").get("vocab_size") or 0))
    log.info("run %s: base %s (%s, %.3gB parameters) merged in %s; needs ~%.1f GiB RAM", run, base_name,
             base_path, params / 1e9, dtype, plan["ram_needed_bytes"] / GIB)
    from training.console import quiet_libraries

    quiet_libraries()
    converter = None
    if quant:  # fail on a missing converter now, not after the merge
        converter = Path(args.converter_dir) if args.converter_dir else default_converter_dir()
        converter = fetch_converter(converter, Path(args.converter_sdist) if args.converter_sdist else None)

    t0 = time.time()
    if reuse is not None:
        merge_info = reuse
        log.info("reusing the merge in %s (same adapter, base and precision)", merged_dir)
    else:
        log.info("merging the adapter into the base in %s ...", dtype)
        merge_info = merge_adapter(run_dir, base_name, base_path, dtype, merged_dir,
                                   compare_trained=not args.no_trained_comparison)
        c = merge_info["merged_vs_adapter_on_base"]
        log.info("merged into %s: vs adapter-on-base top-1 %.3f, max logit diff %.2g (%.2g sd)", merged_dir,
                 c["top1_agreement"], c["max_logit_diff"], c["max_logit_diff_sd"])
        t = merge_info.get("merged_vs_trained_4bit", {})
        if "top1_agreement" in t:
            log.info("vs the model as trained (4-bit base + adapter): top-1 %.3f, max logit diff %.2g sd "
                     "(the base's NF4 rounding, left out of the export)", t["top1_agreement"], t["max_logit_diff_sd"])
    timings["merge_s"] = round(time.time() - t0, 2)
    report = {"run": run, "format": args.format, "quant": quant, "created": time.time(), "base": base_name,
              "base_path": str(base_path), "resources": plan, "merge": merge_info, "merged_dir": str(merged_dir),
              "merged_bytes": _folder_bytes(merged_dir)}
    if not quant:
        report.update(timings={**timings, "total_s": round(time.time() - t_start, 2)}, passed=True)
        write_json_atomic(merged_dir / "export_report.json", report)
        return report

    name = f"{run}-{quant}"
    final = gguf_root / name
    _remove_stale_tmp(gguf_root)
    work = gguf_root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        report.update(gguf_export(converter, merged_dir, work, name, quant, timings))
        report["timings"] = {**timings, "total_s": round(time.time() - t_start, 2)}
        report["passed"] = all(c["passed"] for c in report["checks"].values())
        write_json_atomic(work / "export_report.json", report)
        if not report["passed"]:
            kept = run_dir / f"export_report-{quant}-failed.json"  # the evidence stays, outside the GGUF folder
            write_json_atomic(kept, report)
            raise CheckFailed("the GGUF does not say what the merged model says:\n" +
                              "\n".join(f"  {k}: {describe_check(k, v)}" for k, v in report["checks"].items()
                                        if not v["passed"]) + f"\nfull report: {kept}")
        for extra in ("reference_logits.npz", "worker_job.json", "worker_result.json", "intermediate.gguf"):
            (work / extra).unlink(missing_ok=True)
        report["gguf_dir"] = str(final)
        write_json_atomic(work / "export_report.json", report)
        _replace_dir(work, final)
        (run_dir / f"export_report-{quant}-failed.json").unlink(missing_ok=True)  # an older failure is history
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def gguf_export(converter: Path, merged_dir: Path, work: Path, name: str, quant: str, timings: dict) -> dict:
    import numpy as np
    from transformers import AutoTokenizer

    q = QUANTS[quant]
    config = read_json(merged_dir / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    texts, ids = check_prompts(tokenizer)
    # reference: the saved merged model, computed in float32 when it fits (a bf16 reference adds its own rounding)
    dtype = merge_dtype_name(merged_dir, "auto")
    params = safetensors_param_count(merged_dir)
    ref_dtype = "float32" if params * 4 * 1.2 + 1.5 * GIB < available_ram_bytes()[0] else dtype
    t0 = time.time()
    model = load_causal_lm(merged_dir, ref_dtype)
    ref = prompt_logits(model, ids)
    del model
    gc.collect()
    np.savez(work / "reference_logits.npz", **{f"p{i}": a for i, a in enumerate(ref)})
    timings["reference_s"] = round(time.time() - t0, 2)

    gguf_path = work / f"{name}.gguf"
    t0 = time.time()
    first = work / "intermediate.gguf" if q.ftype else gguf_path
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

    t0 = time.time()
    log.info("checking the GGUF against the merged model ...")
    res = run_worker({"task": "check", "gguf": str(gguf_path), "converter": str(converter), "texts": texts,
                      "ids": ids, "reference": str(work / "reference_logits.npz")}, work)
    expected = {"config": config, "arch": config.get("model_type"),
                "tensors": expected_tensor_count(merged_dir, config),
                "chat_template": tokenizer.chat_template, "reference_dtype": ref_dtype,
                "adds_bos": wants_bos(tokenizer)}
    checks = evaluate_checks(res, expected, quant)
    timings["check_s"] = round(time.time() - t0, 2)
    c = checks["logits_vs_merged"]
    log.info("GGUF %s vs merged model over %d positions: top-1 agreement %.3f (limit %.2f), max logit diff %.3g = "
             "%.3g sd (limit %.3g sd)", quant, c["positions"], c["top1_agreement"], c["limit_top1"],
             c["max_logit_diff"], c["max_logit_diff_sd"], c["limit_max_logit_diff_sd"])
    from training.templates import default_system_prompt, family

    fam = family(tokenizer)
    if fam is None:
        log.warning("no Ollama template for this chat template: the Modelfile leaves it to Ollama, which reads "
                    "tokenizer.chat_template from the GGUF")
    (work / "Modelfile").write_text(modelfile_text(gguf_path.name, min(int(config.get("max_position_embeddings")
                                                                           or 8192), 8192), fam,
                                                   default_system_prompt(tokenizer)), encoding="utf-8")
    return {"gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size, "modelfile": "Modelfile",
            "converter": read_json(converter / "converter_info.json"), "llama_cpp_python": llama_cpp_version(),
            "checks": checks}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _remove_stale_tmp(gguf_root: Path) -> None:
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


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run name under --output-dir (default: the newest run with an adapter)")
    p.add_argument("--format", choices=("gguf", "merged"), default="gguf",
                   help="gguf: merged model + GGUF + Modelfile; merged: merged safetensors only (default: %(default)s)")
    p.add_argument("--quant", default="q8_0", metavar="|".join(QUANTS),
                   help="GGUF type; q8_0 is near-lossless at half of bf16's size (default: %(default)s)")
    p.add_argument("--base", help="base model id or folder (default: the one the run was trained on)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept a --base other than the adapter's recorded one (e.g. a local copy of the same weights)")
    p.add_argument("--dtype", choices=("auto", "bf16", "f32", "f16"), default="auto",
                   help="merge precision; auto: the base checkpoint's own (bf16 for Gemma) (default: %(default)s)")
    p.add_argument("--force-merge", action="store_true", help="merge again even if outputs/<run>/merged/ is current")
    p.add_argument("--no-trained-comparison", action="store_true",
                   help="skip the informational comparison with the 4-bit model as trained (slow for big models)")
    p.add_argument("--output-dir", default=os.environ.get("OUTPUT_DIR", "outputs"), help="default: %(default)s")
    p.add_argument("--gguf-dir", default=os.environ.get("GGUF_DIR", "models/gguf"), help="default: %(default)s")
    p.add_argument("--converter-dir", help="unpacked llama.cpp converter (default: $LLAMA_CPP_CONVERTER_DIR or "
                                           "models/converters/llama-cpp-python-VERSION)")
    p.add_argument("--converter-sdist", help="a llama_cpp_python-VERSION.tar.gz to unpack the converter from")
    p.add_argument("--fetch-converter", action="store_true", help="only make the converter ready, then exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.worker:
        return worker_main(Path(args.worker))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    try:
        if args.fetch_converter:
            folder = Path(args.converter_dir) if args.converter_dir else default_converter_dir()
            fetch_converter(folder, Path(args.converter_sdist) if args.converter_sdist else None)
            print(f"converter ready in {folder}")
            return 0
        report = export(args)
    except ExportError as exc:
        log.error("%s", exc)
        return 2
    except CheckFailed as exc:
        log.error("export check failed: %s", exc)
        return 3
    except Exception as exc:
        from training.disk import export_disk_full_message, is_disk_full

        if not is_disk_full(exc, Path(args.gguf_dir)):
            raise
        log.error("%s", export_disk_full_message(exc, Path(args.output_dir), Path(args.gguf_dir)))
        return 2
    if report.get("gguf_dir"):
        c = report["checks"]["logits_vs_merged"]
        print(f"exported {report['gguf_dir']}/{report['gguf_file']} ({report['gguf_bytes'] / 2**20:.1f} MiB): "
              f"top-1 agreement {c['top1_agreement']:.3f}, max logit diff {c['max_logit_diff_sd']:.3g} sd; "
              f"ollama create {report['run']} -f {report['gguf_dir']}/Modelfile")
    else:
        print(f"merged model in {report['merged_dir']} ({report['merged_bytes'] / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
