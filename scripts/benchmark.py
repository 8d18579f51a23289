"""QLoRA step benchmark on a CUDA card: the baseline, unsloth standalone and the project path, side by side.

Models of the real Gemma-2-2B / 9B shapes with random weights (same FLOPs and bytes as the real ones, no download).
Every variant runs in its own subprocess (Liger and unsloth patch transformers globally) with the same LoRA
(r=32, all linear layers), NF4 + double quant, 8-bit paged AdamW and the same tokens per optimizer step
(16 x 2048, reached by gradient accumulation). Warm-up steps are excluded; the median of timed steps is reported.

    python scripts/benchmark.py                       # default set of variants, writes docs/benchmarks.md
    python scripts/benchmark.py --variants baseline-2b,project-2b --steps 3
    make bench

Variants: baseline-{2b,9b} (the seed's plain transformers + peft, eager attention, as in the team's
shared qlora_step_bench.py), unsloth-2b (FastLanguageModel, its defaults), project-{2b,9b} (training.model: backend
auto + the VRAM planner for this card), project24-{2b,9b} (same, planned for a 24 GiB card), fallback24-{2b,9b}
(backend hf + Liger, planned for a 24 GiB card).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    "2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256),
    "9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256),
}
SEQ = 2048
SEQUENCES_PER_STEP = 16
DEFAULT_VARIANTS = ("baseline-2b,unsloth-2b,project-2b,project24-2b,fallback24-2b,"
                    "baseline-9b,project24-9b,fallback24-9b")


def model_dir(shape: str, root: Path) -> Path:
    """Random-init Gemma-2 of the real shape, saved once in bf16 (with the tiny tokenizer: unsloth wants one)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    path = root / f"gemma2-{shape}"
    if (path / "config.json").is_file():
        return path
    cfg = Gemma2Config(vocab_size=256000, max_position_embeddings=8192, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(str(path))
    del m
    torch.cuda.empty_cache()
    from training.tiny import build_tiny_model, default_dir

    for f in build_tiny_model(default_dir()).iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            (path / f.name).write_bytes(f.read_bytes())
    return path


def matmul_tflops() -> float:
    """Measured dense bf16 matmul rate of this card (the MFU denominator)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def step_flops(cfg, tokens: int, ckpt: bool) -> float:
    """Model FLOPs of one step (forward + backward (+ recompute)), as in the shared baseline script."""
    L, H, I, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    lin = L * (H * hd * (nq + 2 * nkv) + nq * hd * H + 3 * H * I) + H * V
    attn = L * 2 * SEQ * nq * hd * 2
    return (4 + 2 * ckpt) * (lin * tokens + attn * tokens / 2)


def load_variant(kind: str, path: Path, gpu_mem: float | None):
    """Returns (model, micro_batch, ckpt, description, planner_estimate_gib)."""
    import torch

    from training.plan import Arch, estimate_peak

    if kind == "baseline":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        m = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=torch.bfloat16,
                                                 attn_implementation="eager", device_map={"": 0})
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        m = get_peft_model(m, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
        bs = 4 if "9b" not in path.name else 2
        est = estimate_peak(Arch.from_config(m.config), bs, SEQ, 32, "hf", True, fused_loss=False)
        return m, bs, True, "transformers + peft, eager, no fused loss", est.peak_gib
    if kind == "unsloth":
        from training.backends import load_unsloth

        m = load_unsloth(str(path), SEQ, 32, 16, 0.0, True, 0)
        est = estimate_peak(Arch.from_config(m.config), 4, SEQ, 32, "unsloth")
        return m, 4, True, "unsloth FastLanguageModel, its defaults", est.peak_gib

    # The project path: the same functions the recipe calls.
    from dataclasses import replace

    from training.backends import choose_backend
    from training.model import load_qlora_model, pick_device, plan_for_device
    from training.plan import budget_gib, plan
    from training.qlora_config import PRESETS

    preset = PRESETS["gemma-2b" if "2b" in path.name else "gemma-9b"]
    cfg = replace(preset, model_name_or_path=str(path), backend="hf" if kind == "fallback" else "auto",
                  gpu_mem_gib=gpu_mem or 0.0)
    device = pick_device(cfg, "bench")
    backend = choose_backend(cfg.backend, device.kind, "gemma2")
    cfg, line = plan_for_device(cfg, device, backend.label)
    torch.manual_seed(0)
    m = load_qlora_model(cfg, str(path), device, backend.label)
    arch = Arch.from_config(m.config)
    p = plan(arch, SEQUENCES_PER_STEP, SEQ, 32, cfg.gpu_mem_gib or device.memory_gib,
             "unsloth" if backend.name == "unsloth" else "hf", fused_loss=backend.label != "hf",
             max_micro_batch=cfg.max_micro_batch)
    desc = f"{backend.label}: {line}; budget {budget_gib(cfg.gpu_mem_gib or device.memory_gib):.1f} GiB"
    return m, cfg.per_device_train_batch_size, cfg.gradient_checkpointing, desc, p.predicted_peak_gib


def run_variant(name: str, root: Path, steps: int, warmup: int) -> dict:
    """Runs in a child process: load, warm up, time `steps` optimizer steps of 16 x 2048 tokens."""
    import bitsandbytes as bnb
    import torch

    kind, shape = name.split("-")
    gpu_mem = 24.0 if kind in ("project24", "fallback24") else None
    kind = {"project24": "project", "fallback24": "fallback"}.get(kind, kind)
    path = model_dir(shape, root)
    t_load = time.perf_counter()
    m, bs, ckpt, desc, predicted = load_variant(kind, path, gpu_mem)
    load_s = time.perf_counter() - t_load
    m.train()
    torch.cuda.reset_peak_memory_stats()  # the peak a user hits includes the first steps
    params = [p for p in m.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    accum = SEQUENCES_PER_STEP // bs
    gen = torch.Generator(device="cuda").manual_seed(0)

    def optimizer_step(first_grad_check: bool = False):
        total = 0.0
        for _ in range(accum):
            ids = torch.randint(0, 256000, (bs, SEQ), device="cuda", generator=gen)
            loss = m(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            total += float(loss)
        gnorm = None
        if first_grad_check:
            gnorm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, gnorm

    print(f"loaded in {load_s:.0f}s: {desc}", file=sys.stderr, flush=True)
    first_loss, first_gnorm = optimizer_step(first_grad_check=True)
    for _ in range(max(0, warmup - 1)):
        optimizer_step()
    torch.cuda.synchronize()
    times, loss = [], first_loss
    for _ in range(steps):
        t = time.perf_counter()
        loss, _ = optimizer_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens = SEQUENCES_PER_STEP * SEQ
    peak = torch.cuda.max_memory_allocated() / 2**30
    rate = matmul_tflops()
    flops = step_flops(m.config, tokens, ckpt)
    return dict(variant=name, desc=desc, micro_batch=bs, accumulation=accum, checkpointing=ckpt,
                step_s=round(step_s, 3), tokens_per_s=round(tokens / step_s), peak_gib=round(peak, 2),
                predicted_peak_gib=predicted, first_loss=round(first_loss, 5), first_lora_grad_norm=first_gnorm,
                last_loss=round(loss, 5), mfu=round(flops / step_s / 1e12 / rate, 3), matmul_tflops=round(rate),
                load_s=round(load_s, 1), gpu=torch.cuda.get_device_name())


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "unsloth", "triton"):
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "-"
    return out


def write_markdown(results: list[dict], out: Path, command: str) -> None:
    base = {r["variant"].split("-")[1]: r for r in results if r["variant"].startswith("baseline") and "error" not in r}
    lines = [f"## {results[0].get('gpu', 'GPU')} — {dt.date.today().isoformat()}", "",
             f"Command: `{command}`  ", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
             "| variant | micro-batch x accum | ckpt | tokens/s | vs baseline | peak GiB | planner GiB (err) | MFU | "
             "step s | loss step 1 (vs baseline) | grad norm step 1 | what |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | | | failed | | | | | | | | {r['error'][:200]} |")
            continue
        b = base.get(r["variant"].split("-")[1])
        speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
        dloss = f" ({100 * (r['first_loss'] / b['first_loss'] - 1):+.2f}%)" if b else ""
        err = 100 * (r["predicted_peak_gib"] / r["peak_gib"] - 1) if r["peak_gib"] else 0
        lines.append(f"| {r['variant']} | {r['micro_batch']} x {r['accumulation']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['tokens_per_s']:,} | {speed} | {r['peak_gib']} | {r['predicted_peak_gib']} ({err:+.0f}%) | "
                     f"{r['mfu']:.2f} | {r['step_s']} | {r['first_loss']}{dloss} | "
                     f"{r['first_lora_grad_norm']:.4g} | {r['desc']} |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "" if out.exists() else "# Benchmarks\n\nWritten by `scripts/benchmark.py`; newest first.\n\n"
    old = out.read_text() if out.exists() else ""
    if old.startswith("# Benchmarks"):
        head, _, rest = old.partition("\n## ")
        out.write_text(head.rstrip() + "\n\n" + text + ("\n## " + rest if rest else ""))
    else:
        out.write_text(header + text + old)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--models-dir", default="/tmp/qlora-bench-models")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--json-out", help="also write the raw results here (rewritten after every variant)")
    p.add_argument("--variant-timeout", type=int, default=900, help="seconds before a variant counts as failed")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    root = Path(args.models_dir)
    root.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, root, args.steps, args.warmup)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU (it measures GPU speed and memory)", file=sys.stderr)
        return 2
    results = []
    env = {**os.environ, "UNSLOTH_COMPILE_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    for name in args.variants.split(","):
        print(f"== {name}", flush=True)
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup",
                                   str(args.warmup), "--models-dir", str(root)], capture_output=True, text=True,
                                  env=env, timeout=args.variant_timeout)
        except subprocess.TimeoutExpired as exc:
            text = [x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr)]
            proc = subprocess.CompletedProcess(exc.cmd, -9, text[0], text[1] + f"\ntimed out after {exc.timeout}s")
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line:
            results.append(json.loads(line[7:]))
            print(json.dumps(results[-1]), flush=True)
        else:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"variant": name, "error": err})
            print(f"   failed: {proc.stderr[-2500:]}", flush=True)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1))
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_markdown(results, Path(args.out), command.strip())
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
