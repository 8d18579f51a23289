"""The gated activation of an MLP, c = act(a) * b (a: the gate projection's output, b: the up projection's), with a
backward that recomputes c instead of reading a kept copy: training/fast_lora.py's LoRA4bitGatedDown keeps only a and
b, which the activation's backward needs anyway, and gets c back from here for the down projection's adapter
gradient. That drops one (tokens x intermediate) tensor per layer from what a step keeps (on Gemma-2 2B, 18 KB per
token per layer: 15 GiB at 16 x 2048 tokens).

KINDS: "gelu_tanh" (Gemma's GeGLU, GELU's tanh form) and "silu" (SwiGLU: Llama, Mistral, Qwen). The activation is
computed in fp32 and rounded to b's dtype before the product, as Liger's kernels and transformers' modules do. On CUDA
two Triton kernels do one pass each: the forward reads a and b and writes c; the backward reads dc, a and b and writes
da over a, db over b and c over dc (Liger's GeGLU/SwiGLU kernels do the same passes, less c's write), and bump
their versions, so a second backward through a retained graph is refused instead of reading gradients as
activations. torch.compile calls the two as they are (a graph break). Elsewhere (the CPU, no Triton) plain
PyTorch computes the same. Checked on an H100: the kernels against PyTorch (below), a retained graph refused, the
same gradients under torch.utils.checkpoint and torch.compile.

    python -m training.gated_act --check   # on a CUDA card: the Triton kernels against PyTorch, per kind and dtype
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

KINDS = ("gelu_tanh", "silu")
BLOCK = 1024  # columns per Triton program (the intermediate widths: 9,216 on Gemma-2 2B, 14,336 on 9B)


def reference(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """c = act(a) * b in plain PyTorch (the activation in fp32 inside the op, rounded to b's dtype)."""
    act = F.gelu(a, approximate="tanh") if kind == "gelu_tanh" else F.silu(a)
    return act.to(b.dtype) * b


def _reference_backward(a, b, dc, kind):
    with torch.enable_grad():
        a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
        c = reference(a_, b_, kind)
        da, db = torch.autograd.grad(c, (a_, b_), dc)
    return c.detach(), da, db


def forward(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """c = act(a) * b, same shape and dtype as b."""
    if a.is_cuda and triton is not None:
        return _triton_forward(a, b, kind)
    return reference(a, b, kind)


def backward(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor, kind: str) -> tuple[torch.Tensor, ...]:
    """(c, da, db) from a, b and the gradient dc. On CUDA in place: da is written over a, db over b and c over dc
    (LoRA4bitGatedDown's backward reads none of them again), and their versions are bumped, so a second backward
    through a retained graph that saved a and b fails loudly (modified by an inplace operation) instead of reading
    gradients as activations. A forward hook that kept gate's or up's output sees it overwritten too."""
    if a.is_cuda and triton is not None:
        return _triton_backward(a, b, dc, kind)
    return _reference_backward(a, b, dc, kind)


try:  # Triton exists where CUDA does; the kernels live at module level so that torch.compile can re-emit them
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    @triton.jit
    def _act(a, SILU: tl.constexpr):  # (act(a), act'(a)) in fp32
        if SILU:
            sig = tl.sigmoid(a)
            act = a * sig
            dact = sig * (1.0 + a * (1.0 - sig))
        else:
            k = 0.7978845608028654  # sqrt(2 / pi)
            t = 2.0 * tl.sigmoid(2.0 * k * (a + 0.044715 * a * a * a)) - 1.0  # tanh
            act = 0.5 * a * (1.0 + t)
            dact = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * a * a)
        return act, dact

    @triton.jit
    def _load(a_ptr, b_ptr, n_cols, BLOCK: tl.constexpr):  # this program's block: offsets, mask, a (fp32), b
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = tl.program_id(0).to(tl.int64) * n_cols + cols
        a = tl.load(a_ptr + offs, mask=mask, other=0).to(tl.float32)
        return offs, mask, a, tl.load(b_ptr + offs, mask=mask, other=0)

    @triton.jit
    def _forward_kernel(a_ptr, b_ptr, c_ptr, n_cols, SILU: tl.constexpr, BLOCK: tl.constexpr):
        offs, mask, a, b = _load(a_ptr, b_ptr, n_cols, BLOCK)
        act, _ = _act(a, SILU)
        tl.store(c_ptr + offs, act.to(b.dtype) * b, mask=mask)

    @triton.jit
    def _backward_kernel(a_ptr, b_ptr, dc_ptr, n_cols, SILU: tl.constexpr, BLOCK: tl.constexpr):
        offs, mask, a, b = _load(a_ptr, b_ptr, n_cols, BLOCK)
        dc = tl.load(dc_ptr + offs, mask=mask, other=0).to(tl.float32)
        act, dact = _act(a, SILU)
        act_r = act.to(b.dtype)  # as the forward rounded it
        tl.store(dc_ptr + offs, act_r * b, mask=mask)  # c, over dc (read above)
        tl.store(a_ptr + offs, (dc * b.to(tl.float32) * dact).to(b.dtype), mask=mask)
        tl.store(b_ptr + offs, (dc * act_r.to(tl.float32)).to(b.dtype), mask=mask)


def _grid(t: torch.Tensor) -> tuple[int, int]:
    return (t.numel() // t.shape[-1], triton.cdiv(t.shape[-1], BLOCK))


# torch.compile runs these two as they are (a graph break): traced, the in-place backward gave wrong gradients (H100)
@torch.compiler.disable
def _triton_forward(a, b, kind):
    a, b = a.contiguous(), b.contiguous()
    c = torch.empty_like(b)
    if c.numel():
        _forward_kernel[_grid(b)](a, b, c, b.shape[-1], SILU=kind == "silu", BLOCK=BLOCK)
    return c


@torch.compiler.disable
def _triton_backward(a, b, dc, kind):
    a, b, dc = a.contiguous(), b.contiguous(), dc.contiguous()
    if dc.numel():
        _backward_kernel[_grid(b)](a, b, dc, b.shape[-1], SILU=kind == "silu", BLOCK=BLOCK)
    for t in (a, b, dc):  # written in place behind autograd's back: a graph that reads them again must refuse
        torch.autograd.graph.increment_version(t)
    return dc, a, b


def check(device: str = "cuda") -> list[str]:
    """The Triton kernels against PyTorch on random inputs, per kind and dtype; returns the failures (none: pass).
    The forward must agree to the last bit but for rare one-ulp ties; the gradients within bf16/fp16 rounding."""
    failures = []
    gen = torch.Generator(device).manual_seed(0)
    for kind in KINDS:
        for dtype in (torch.bfloat16, torch.float16):
            a = torch.randn(37, 3 * BLOCK + 17, device=device, dtype=dtype, generator=gen) * 3
            b = torch.randn(a.shape, device=device, dtype=dtype, generator=gen)
            dc = torch.randn(a.shape, device=device, dtype=dtype, generator=gen)
            c_ref, da_ref, db_ref = _reference_backward(a, b, dc, kind)
            c_fwd = forward(a, b, kind)
            c, da, db = backward(a.clone(), b.clone(), dc.clone(), kind)
            for what, got, want in (("forward c", c_fwd, c_ref), ("backward c", c, c_ref), ("da", da, da_ref),
                                    ("db", db, db_ref)):
                err = ((got.float() - want.float()).abs() / (want.float().abs() + 1e-2)).max().item()
                line = f"{kind} {str(dtype).replace('torch.', '')} {what}: max relative error {err:.2e}"
                print(line)
                if err > 2e-2:
                    failures.append(line)
    return failures


if __name__ == "__main__":
    if sys.argv[1:] != ["--check"]:
        sys.exit(__doc__)
    if not torch.cuda.is_available() or triton is None:
        sys.exit("error: --check needs a CUDA card and Triton (it compares the Triton kernels with PyTorch)")
    bad = check()
    print("gated_act kernels: " + ("FAILED: " + "; ".join(bad) if bad else "match PyTorch"))
    sys.exit(1 if bad else 0)
