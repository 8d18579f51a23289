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

The package, one module per step: run.py (the run and its base), resources.py (RAM/disk), converter.py (llama.cpp's
converter), merge.py, gguf.py (conversion, quantisation, the checks' run) with worker.py (the child process for
llama.cpp's native code), checks.py (logit and GGUF checks), modelfile.py, pipeline.py (export() in phases) and
cli.py (the command line, ExportOptions).
"""

from training.export.errors import CheckFailed, ExportError
from training.export.run import find_run, read_json, resolve_base
from training.export.quants import QUANTS, Quant
from training.export.converter import LLAMA_CPP_PYTHON_VERSION, SDIST_SHA256, fetch_converter, llama_cpp_version
from training.export.modelfile import modelfile_text
from training.export.pipeline import export
from training.export.cli import ExportOptions, main, make_parser

__all__ = ["CheckFailed", "ExportError", "ExportOptions", "LLAMA_CPP_PYTHON_VERSION", "QUANTS", "Quant",
           "SDIST_SHA256", "export", "fetch_converter", "find_run", "llama_cpp_version", "main", "make_parser",
           "modelfile_text", "read_json", "resolve_base"]
