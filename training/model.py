"""The base model's files, before anything large loads: is it there, whole and reachable, how big is it, what type,
and its tokenizer.

A local folder must hold `config.json`, complete safetensors weights (every shard the index names, none cut short)
and tokenizer files; a hub id must be reachable (or cached, with HF_HUB_OFFLINE=1) and, when gated, readable with
HF_TOKEN. Each problem raises ModelLoadError naming the file or the id and the fix (models/README.md). The parameter
count comes from the config alone (a meta-device model: no weights are read), for the CPU admission in device.py.
The 4-bit model with its adapters is built by the backend that trains it (training/backends.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError


class ModelLoadError(UserError, RuntimeError):
    """The base model or tokenizer cannot be loaded (missing path, gated repo, no network...)."""


README = "models/README.md"
# Any one of these makes a folder loadable by AutoTokenizer (fast tokenizer, SentencePiece, BPE vocab + merges).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def looks_like_path(name: str) -> bool:
    """A local path (which must exist) rather than a hub id `org/name`."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def load_base_config(model_path: str):
    """The model's config (local config.json, or the hub's few KB), or ModelLoadError with the fix."""
    from transformers import AutoConfig

    if looks_like_path(model_path):
        folder = Path(model_path).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"cannot load '{model_path}': the folder {folder} does not exist.\n-> give an existing folder (in Docker: "
                                 f"MODEL=/host/path is mounted read-only), or a hub id such as google/gemma-2-2b "
                                 f"({README})")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder / 'config.json'} is missing: {folder} is not a Hugging Face model folder.\n"
                                 f"-> copy the whole folder as downloaded (config.json, *.safetensors, tokenizer "
                                 f"files), e.g. `hf download ORG/NAME --local-dir {folder}` ({README})")
    try:
        return AutoConfig.from_pretrained(str(Path(model_path).expanduser()) if looks_like_path(model_path)
                                          else model_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(explain_load_error(model_path, exc)) from None


def check_base_model(model_path: str):
    """Config readable (local or hub), and a local folder's weights and tokenizer all there and whole; the config."""
    config = load_base_config(model_path)
    check_model_folder(model_path)
    return config


def check_model_folder(model_path: str) -> None:
    """A local folder's weights are all there and whole, and it has a tokenizer; hub ids pass (loading checks)."""
    if not looks_like_path(model_path):
        return
    from safetensors import SafetensorError, safe_open

    folder = Path(model_path).expanduser()
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: unreadable shard index ({exc}).\n-> download the model again "
                                 f"({README})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"{folder / missing[0]} is missing ({len(missing)} of the {len(shards)} shards "
                                 f"{index.name} lists).\n-> copy the missing shards, or download the model again "
                                 f"({README})")
        weights = [folder / s for s in shards]
    else:
        weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin).\n-> copy the weight "
                             f"files too, or download the model again ({README})")
    for shard in weights:
        try:
            with safe_open(str(shard), framework="pt"):  # reads the header: catches a file cut short
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{shard} is damaged ({exc}; {shard.stat().st_size:,} bytes): a download or copy "
                                 f"that did not finish.\n-> copy or download this file again ({README})") from None
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}).\n-> copy them "
                             f"from the original model folder, e.g. `hf download ORG/NAME --include 'tokenizer*' "
                             f"--local-dir {folder}` ({README})")


def count_parameters(model_name_or_path: str) -> int:
    """Parameters of the base model from its config alone: the presets' known architectures without a download,
    anything else as a model on the meta device (shapes, no memory)."""
    from training.plan import KNOWN_ARCHS

    if model_name_or_path in KNOWN_ARCHS:
        arch = KNOWN_ARCHS[model_name_or_path]
        return arch.linear_params() + arch.vocab * arch.hidden  # Gemma ties input and output embeddings
    import torch
    from transformers import AutoModelForCausalLM

    from training.tiny import resolve_builtin

    config = load_base_config(resolve_builtin(model_name_or_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def explain_load_error(model_path: str, exc: BaseException) -> str:
    """What went wrong loading `model_path` (a real exception from transformers / huggingface_hub) and the fix."""
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    from huggingface_hub import constants

    hub = constants.ENDPOINT  # https://huggingface.co unless HF_ENDPOINT names a mirror
    from training.disk import exception_chain

    chain = exception_chain(exc)
    text = " ".join(str(e) for e in chain)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if any(isinstance(e, GatedRepoError) for e in chain) or "gated repo" in text.lower():
        if _have_token():
            hint = (f"'{model_path}' is gated and your HF_TOKEN has no access to it yet: accept the licence at "
                    f"{hub}/{model_path} with the account that owns the token, then run again")
        else:
            hint = (f"'{model_path}' is gated: accept its licence at {hub}/{model_path}, create a read token "
                    f"({hub}/settings/tokens) and export HF_TOKEN=hf_... before running ({README})")
    elif any(isinstance(e, OfflineModeIsEnabled) for e in chain) or (
            _offline() and "couldn't connect" in text.lower()):
        hint = (f"HF_HUB_OFFLINE is set and '{model_path}' is not in the Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}): download it once where the hub is "
                f"reachable, or pass --model /path/to/local/folder ({README})")
    elif "couldn't connect" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
        hint = (f"the Hugging Face hub ({hub}) is unreachable from here and '{model_path}' is not cached: download "
                f"it where the hub is reachable and pass --model /path/to/folder, or if it is in the cache set "
                f"HF_HUB_OFFLINE=1 to skip the hub ({README})")
    elif any(isinstance(e, RepositoryNotFoundError) for e in chain) or "not a valid model identifier" in text:
        hint = (f"no model '{model_path}' on the hub (or it is private): check the spelling, or give a local "
                f"folder ({README})")
    else:
        hint = f"check the id or path (a local folder needs config.json, the weights and tokenizer files; {README})"
    return f"cannot load '{model_path}': {first}\n-> {hint}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _have_token() -> bool:
    """HF_TOKEN, the file HF_TOKEN_PATH names (the Compose secret), or a stored `hf auth login`."""
    from huggingface_hub import get_token

    return get_token() is not None


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(explain_load_error(model_path, exc)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches need a pad id; labels mask it anyway
    return tokenizer


@dataclass(frozen=True)
class AttentionShape:
    """What an attention kernel is built for, read from the base model's config: the attention self-checks
    (training/backends.py) build their small model with it, so FA4's or flex's kernel is checked for the head size,
    grouping and soft-cap the run will use. The defaults are Gemma-2's."""

    head_dim: int = 256
    # query heads per key/value head. The check builds `group` query heads over one kv head; flex's grouped-query
    # route needs a power-of-two head count, so a model with, e.g., 40 heads over 10 (Phi-3-medium) runs flex's other
    # route than its check does
    group: int = 2
    softcap: float | None = 50.0  # attention logit soft-cap (Gemma-2), None for most models
    sliding_window: int | None = None

    @property
    def variant(self) -> str:
        """The kernel variant, as the self-check verdicts are keyed (the window is the check's own)."""
        return f"head_dim {self.head_dim}, query heads per kv head {self.group}, soft-cap {self.softcap or 'none'}"


def attention_shape_of(config) -> AttentionShape:
    """The base model's attention shape (a multimodal model's text config's, Gemma-3's). A config without attention
    heads (a state-space model) gets Gemma-2's, with its window if any: the attention checks are then moot. Not for
    MLA models (DeepSeek-V3), whose q/k head size is not head_dim."""
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    if not heads:
        return AttentionShape(sliding_window=sliding_window_of(config))
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    softcap = getattr(text, "attn_logit_softcapping", None)
    return AttentionShape(head_dim=head_dim, group=max(1, heads // kv), softcap=float(softcap) if softcap else None,
                          sliding_window=sliding_window_of(config))


def sliding_window_of(config) -> int | None:
    """The attention's sliding window in tokens of a model config (Gemma-2: 4096; a multimodal model's text config,
    Gemma-3's), or None where no layer uses one (transformers sets it None where a config names an unused one)."""
    window = getattr(config.get_text_config(), "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None
