"""Exploratory lever timing for the next lease (not the benchmark of record): flex attention's kernel at Gemma-2's
head_dim 256 on this card, on the project's own path (scripts/benchmark.py::load_project, i.e. the recipe's
prepare() and the backend's loader), full 2048-token rows, no recompute when the card allows it.

Rows: transformers' default flex compile with inductor's per-GPU default kernel configuration; the same with
inductor's max_autotune on (block sizes, warps and stages timed for this shape); explicit kernel_options (block
sizes, warps, stages, TMA); and sdpa, which drops Gemma-2's soft-cap (not exact: the kernel ceiling only). The LoRA
weights and the optimizer start afresh for every row, and every row sees the same batches, so the losses compare.
`--profile` adds one profiled step per row: device time by kernel category and the costliest kernels.

    python scripts/device/explore_flex.py [--steps 4] [--only NAME,...] [--profile NAME,...|all]   # on the device
    python scripts/device/explore_flex.py --device cpu --shape tiny --steps 1 --only eager   # a smoke run here

Prints one `RESULT {json}` line per row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def bwd(block_m: int, block_n: int, warps: int, stages: int) -> tuple:
    """A row with the backward kernel's blocks, warps and stages set (its dQ pass takes the transposed blocks)."""
    return (None, {"bwd_BLOCK_M1": block_m, "bwd_BLOCK_N1": block_n, "bwd_BLOCK_M2": block_n, "bwd_BLOCK_N2": block_m,
                   "bwd_num_warps": warps, "bwd_num_stages": stages}, "flex_attention")


# name -> (autotune mode or None for the per-GPU default configuration, kernel_options or None, attention)
ROWS = {
    "default": (None, None, "flex_attention"),
    "autotune": ("max-autotune", None, "flex_attention"),
    "fwd64x64-w4-s3": (None, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, "flex_attention"),
    "fwd128x64-w8-s3": (None, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, "flex_attention"),
    "fwd64x32-w4-s2": (None, {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}, "flex_attention"),
    "bwd64x64-w8": (None, {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                           "num_warps": 8}, "flex_attention"),  # 8 warps for the forward too
    "fwd128x64-w8-s2": (None, {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2},
                        "flex_attention"),
    "bwd64x64-w4-s2": bwd(64, 64, 4, 2),
    "bwd32x64-w4-s3": bwd(32, 64, 4, 3),
    "bwd64x64-w8-s1": bwd(64, 64, 8, 1),
    "bwd64x64-w8-s2": bwd(64, 64, 8, 2),
    "bwd32x64-w8-s2": bwd(32, 64, 8, 2),
    "bwd64x128-w8-s1": bwd(64, 128, 8, 1),
    "bwd32x32-w4-s3": bwd(32, 32, 4, 3),
    "tma": (None, {"USE_TMA": True}, "flex_attention"),
    "sdpa (inexact: no soft-cap)": (None, None, "sdpa"),
    "eager": (None, None, "eager"),  # exact and slow: the reference (and the CPU smoke run)
}


def load_bench():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def use_flex_compile(mode: str | None) -> None:
    """A fresh compile of flex attention, as transformers makes it (a process-wide singleton), with inductor's
    autotuning on (`mode` set) or off (its per-GPU default configuration)."""
    import torch
    import torch._inductor.config as inductor_config
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    torch._dynamo.reset()
    inductor_config.max_autotune = mode is not None
    wrapper = hf_flex.WrappedFlexAttention(True)  # the singleton (training mode); its instance holds the function
    wrapper._compiled_flex_attention = torch.compile(flex_attention)
    wrapper._is_flex_compiled, wrapper.training = True, True


def inject_kernel_options(model, options: dict | None) -> list:
    """Every attention module's call gets kernel_options (transformers passes it on to flex_attention)."""
    handles = []
    if not options:
        return handles
    for layer in model.get_base_model().model.layers:
        def hook(module, args, kwargs, opts=options):
            return args, {**kwargs, "kernel_options": dict(opts)}
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", help="comma-separated row names (default: all)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shape", default="2b")
    p.add_argument("--models-dir", default="/tmp/qlora-bench-models")
    p.add_argument("--profile", help="comma-separated row names to profile one more step of (or 'all')")
    args = p.parse_args()
    import bitsandbytes as bnb
    import torch

    from training.plan import Arch

    bench = load_bench()
    root = Path(args.models_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = bench.model_dir(args.shape, root, args.device)
    arch = Arch.from_config(json.loads((path / "config.json").read_text()))
    v = bench.parse_variant(f"project-{args.shape}")
    model, micro_batch, _, desc, _ = bench.load_project(v, path, args.device, arch)
    print("loaded:", desc, flush=True)
    params = [q for q in model.parameters() if q.requires_grad]
    init = [q.detach().clone() for q in params]
    cuda = args.device == "cuda"
    names = args.only.split(",") if args.only else list(ROWS)
    for name in names:
        mode, options, attention = ROWS[name]
        row = {"name": name, "mode": mode, "kernel_options": options, "attention": attention}
        handles = []
        try:
            with torch.no_grad():
                for q, q0 in zip(params, init):
                    q.copy_(q0)
            model.get_base_model().set_attn_implementation(attention)
            if attention == "flex_attention":
                use_flex_compile(mode)
            handles = inject_kernel_options(model, options)
            model.train()
            opt = bnb.optim.AdamW8bit(params, lr=2e-4)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for step in range(args.warmup + args.steps):
                batches = bench.step_batches(step, v, micro_batch, False, arch.vocab)
                total, seconds = bench.optimizer_step(model, params, opt, batches, torch.device(args.device))
                times.append(seconds)
                losses.append(round(total, 5))
            step_s = statistics.median(times[args.warmup:])
            row.update(tokens_per_s=round(bench.ROWS_PER_STEP * bench.SEQ / step_s), first_step_s=round(times[0], 1),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, losses=losses)
            if args.profile and (args.profile == "all" or name in args.profile.split(",")):
                row["profile"] = bench.profile_step(model, params, opt, batches, torch.device(args.device))
            del opt
        except Exception as exc:  # noqa: BLE001 - an exploratory row that fails says why and the next one runs
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        finally:
            for h in handles:
                h.remove()
        print("RESULT", json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
