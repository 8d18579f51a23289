"""Fused LoRA on 4-bit linear layers: base matmul and adapter in one autograd function.

peft's LoRA forward on a bitsandbytes `Linear4bit` computes the base output, clones it, computes the adapter's
output, scales it and adds it: five passes over a (tokens x out_features) tensor in the forward alone, and as many
again in the backward. Here the adapter's product is accumulated into the base output in place
(`out.addmm_(x @ A^T, B^T, alpha=scaling)`), and the backward computes the input gradient the same way
(`dx = dY @ W + scaling * (dY @ B) @ A`), so the big tensors are written once. The 4-bit weight is dequantised with
bitsandbytes in the forward and again in the backward, exactly as bitsandbytes' own `MatMul4Bit` does.
The idea is the one of unsloth's and axolotl's LoRA kernels (both Apache-2.0); this is a plain-PyTorch version,
per layer, with no Triton and no model-specific code.

Used for a LoRA layer only when it is plain LoRA: one active adapter, no dropout, no DoRA, not merged. Any other
state falls back to peft's own forward at call time, so disabling adapters (as evaluation of the base does) or
merging keeps working.
"""

from __future__ import annotations

import types

import torch


class LoRA4bitMatmul(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (x A^T) B^T, with W stored in 4 bits (frozen), A and B trainable."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling: float, dtype: torch.dtype):
        import bitsandbytes.functional as bnbf

        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w = bnbf.dequantize_4bit(weight, weight.quant_state).to(dtype)  # (out, in)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            xa = x2 @ a.t()  # (tokens, r)
            out = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
            out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.weight, ctx.scaling, ctx.dtype = weight, scaling, dtype
        ctx.x_shape, ctx.x_dtype, ctx.ab_dtypes = x.shape, x.dtype, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        import bitsandbytes.functional as bnbf

        x2, xa, a, b = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.dtype
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (tokens, out)
            gb = g @ b  # (tokens, r)
            grad_a = (gb.t() @ x2).mul_(s) if ctx.needs_input_grad[2] else None  # (r, in)
            grad_b = (g.t() @ xa).mul_(s) if ctx.needs_input_grad[3] else None  # (out, r)
            grad_x = None
            if ctx.needs_input_grad[0]:
                w = bnbf.dequantize_4bit(ctx.weight, ctx.weight.quant_state).to(dtype)
                grad_x = (g @ w).addmm_(gb, a, alpha=s).view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None, grad_a.to(ctx.ab_dtypes[0]) if grad_a is not None else None,
                grad_b.to(ctx.ab_dtypes[1]) if grad_b is not None else None, None, None, None)


def _plain_adapter(module, kwargs) -> str | None:
    """The one active adapter when this call is plain LoRA (what the fused path computes), else None."""
    if module.disable_adapters or module.merged or kwargs or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    if not isinstance(module.lora_dropout[name], torch.nn.Identity) and module.training:
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args else _plain_adapter(self, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = getattr(base, "compute_dtype", None) or x.dtype
    return LoRA4bitMatmul.apply(x, base.weight, self.lora_A[name].weight, self.lora_B[name].weight, base.bias,
                                float(self.scaling[name]), dtype)


def apply_fused_lora(model) -> int:
    """Route every peft LoRA layer on a bitsandbytes 4-bit linear through the fused function; returns how many."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes support: nothing to fuse
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
