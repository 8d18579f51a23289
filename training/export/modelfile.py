"""The Ollama Modelfile written beside the GGUF: the run's chat template family (Gemma or ChatML), its stop tokens
and default system prompt (training/templates.py)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MODELFILE = "Modelfile"


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


def write_modelfile(folder: Path, gguf_name: str, config: dict, tokenizer) -> str:
    """folder/Modelfile for the GGUF `gguf_name` of a model with this config.json and tokenizer; returns its name."""
    from training.templates import default_system_prompt, family

    fam = family(tokenizer)
    if fam is None:
        log.warning("no Ollama template for this chat template: the Modelfile leaves it to Ollama, which reads "
                    "tokenizer.chat_template from the GGUF")
    num_ctx = min(int(config.get("max_position_embeddings") or 8192), 8192)
    (folder / MODELFILE).write_text(modelfile_text(gguf_name, num_ctx, fam, default_system_prompt(tokenizer)),
                                    encoding="utf-8")
    return MODELFILE
