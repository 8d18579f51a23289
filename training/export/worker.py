"""The child process that runs llama.cpp's native code (quantise, load, evaluate), so that a crash there cannot
leave an export half-done: `python -m training.export.worker JOB.json` reads the job, writes worker_result.json
beside it. Started by training.export.gguf.run_worker."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from training.export.checks import compare_logits
from training.export.gguf import RESULT
from training.jsonio import write_json_atomic


def worker_main(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    result = {"quantize": quantize, "check": check_gguf}[job["task"]](job)
    write_json_atomic(job_path.with_name(RESULT), result)
    return 0


def quantize(job: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, job["ftype"])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    return {"rc": rc}


def check_gguf(job: dict) -> dict:
    """Metadata, tensors, tokenizer and logits of the GGUF file."""
    sys.path.insert(0, str(Path(job["converter"]) / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(job["gguf"])
    return {**_file_facts(reader), **_llama_cpp_facts(job)}


def _file_facts(reader) -> dict:
    """What the GGUF file says, read with the converter's own gguf-py: metadata, tensor types, non-finite tensors."""
    import numpy as np
    from gguf.quants import dequantize

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
    return {"metadata": meta, "tensor_count": len(reader.tensors), "tensor_types": types,
            "layers_with_tensors": len(layers), "nonfinite_tensors": nonfinite,
            "chat_template_in_gguf": chat_template}


def _llama_cpp_facts(job: dict) -> dict:
    """What llama.cpp makes of the file: its tokens for the check prompts, <bos>, and its logits vs the reference."""
    import llama_cpp
    import numpy as np

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
    result = {"n_vocab_llama_cpp": llm.n_vocab(),
              "bos_added_by_llama_cpp": llm.tokenize(b"a", add_bos=True, special=False)[:1] == [llm.token_bos()]}
    llm.close()
    result["tokenizer_mismatches"] = token_mismatch
    result["logits"] = compare_logits([ref[f"p{i}"] for i in range(len(job["ids"]))], logits)
    return result


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1])))
