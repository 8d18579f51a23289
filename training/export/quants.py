"""The GGUF types the export writes, the merge precisions, and the limits each one's checks hold it to."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


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
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}  # merge precision -> bytes per parameter
# merged vs adapter-on-base (min top-1, max diff in sd): the same maths, one rounding of W + BA apart
MERGE_LIMITS = {"float32": (0.99, 1e-3), "bfloat16": (0.95, 0.5), "float16": (0.95, 0.5)}
