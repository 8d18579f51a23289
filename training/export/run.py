"""The run to export and its base model: the run folder, the base the adapter was trained on, its size and
precision (read from the files, nothing loaded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from training.export.errors import ExportError
from training.export.quants import DTYPES
from training.runfiles import ADAPTER_CONFIG, ADAPTER_DIR, RUN_SUMMARY


def find_run(output_dir: Path, run: str | None, verb: str = "export") -> Path:
    """The run folder with a saved adapter; without --run, the newest one (`verb`: the make verb, for the hint)."""
    pattern = f"*/{ADAPTER_DIR}/{ADAPTER_CONFIG}"
    if run:
        run_dir = output_dir / run
        if not (run_dir / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
            known = ", ".join(sorted(p.parent.parent.name for p in output_dir.glob(pattern)))
            what = f"has no {ADAPTER_DIR}/ (training did not finish?)" if run_dir.is_dir() else "does not exist"
            raise ExportError(f"run '{run}': {run_dir} {what}.\n-> runs with an adapter in {output_dir}: "
                              f"{known or 'none'}; pass RUN=<one of them> (make {verb}) or --run NAME")
        return run_dir
    found = sorted(output_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
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

    adapter_cfg = read_json(run_dir / ADAPTER_DIR / ADAPTER_CONFIG)
    summary = read_json(run_dir / RUN_SUMMARY)
    trained_on = adapter_cfg.get("base_model_name_or_path") or summary.get("base_model_path") or ""
    name = base_arg or summary.get("config", {}).get("model_name_or_path") or trained_on
    if not name:
        raise ExportError(f"{run_dir}: neither {RUN_SUMMARY} nor {ADAPTER_DIR}/{ADAPTER_CONFIG} names the base "
                          "model.\n-> pass --base ID_OR_PATH (the model this adapter was trained on)")
    try:
        local = resolve_builtin(name)
    except ValueError as exc:
        raise ExportError(f"--base {name}: {exc}") from None
    path = Path(local)
    if not path.is_dir():
        path = download_base(local)
    if trained_on and not same_base(trained_on, path) and not allow_other_base:
        raise ExportError(
            f"the adapter in {run_dir / ADAPTER_DIR} was trained on '{trained_on}' "
            f"({ADAPTER_CONFIG} base_model_name_or_path), not on '{name}' ({path}).\n-> pass --base {trained_on} "
            "(or omit --base), or add --allow-other-base if that folder is a copy of the same weights")
    return name, path


def same_base(trained_on: str, path: Path) -> bool:
    """Whether the folder `path` is the base `trained_on` (a folder, or a hub id) names."""
    if Path(trained_on).is_dir():
        return Path(trained_on).resolve() == path.resolve()
    # a hub id matches its own Hugging Face cache snapshot (models--ORG--NAME/snapshots/HASH)
    return f"models--{trained_on.replace('/', '--')}" in path.resolve().parts


def download_base(repo_id: str) -> Path:
    """A hub id: its files from the Hugging Face cache (downloaded once; HF_TOKEN for gated models)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model",
                                                               "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; all mean the same to the user here
        from training.model import explain_load_error

        raise ExportError(explain_load_error(repo_id, exc)) from None


def safetensors_headers(folder: Path) -> list[dict]:
    """The JSON header of each *.safetensors file in `folder` (tensor name -> dtype, shape, offsets)."""
    headers = []
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            headers.append(json.loads(fh.read(n)))
    return headers


def safetensors_param_count(folder: Path) -> int:
    """Parameters of a safetensors model from the file headers alone (nothing is loaded)."""
    headers = safetensors_headers(folder)
    if not headers:
        raise ExportError(f"{folder} has no *.safetensors weights.\n-> point --base at a Hugging Face model folder "
                          "with safetensors weights (config.json + model*.safetensors)")
    total = 0
    for header in headers:
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
