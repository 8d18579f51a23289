"""Fused LoRA on 4-bit linear layers: base matmul and adapter in one autograd function.

peft's LoRA forward on a bitsandbytes `Linear4bit` computes the base output, clones it, computes the adapter's
output, scales it and adds it: five passes over a (tokens x out_features) tensor in the forward alone, and as many
again in the backward. Here the adapter's product (inner dimension r) is written first and the base product is
accumulated onto it by the big matmul itself (`out = (x A^T) (scaling B)^T; out.addmm_(x, W^T)`), and the backward
computes the input gradient the same way (`dx = (dY scaling B) A; dx.addmm_(dY, W)`). The adapter's product is
bound by memory (inner dimension r, 32 in the presets, for outputs 2,304 or 9,216 wide): written once, and read
back only in the epilogue of the base matmul, which is bound by compute. The other order (`BASE_FIRST`, the
recipe's until 2026-12-07; the benchmark's `-basefirst`) makes the adapter's product read and rewrite the whole
output. The 4-bit weight is dequantised with bitsandbytes in the forward and again in the backward, exactly as
bitsandbytes' own `MatMul4Bit` does.
Layers that read one input (GROUPS: q, k and v; gate and up, found by name under one parent module) run as one
function, LoRA4bitGroupMatmul: one product of the input with all their adapters, and one input gradient that every
member's matmuls accumulate onto, where autograd summed one per member (measured: 2-3% of a step, and 5.5% for the
order above; docs/benchmarks.md, 2026-12-07). The benchmark's `-nogroup` runs them one by one.
A gated MLP (GATED_MLPS: Gemma's GeGLU, the SwiGLU of Llama, Mistral, Qwen) runs its activation and down projection
as one function, LoRA4bitGatedDown, which keeps gate's and up's outputs and not act(gate) * up: the backward
recomputes that product (training/gated_act.py), one (tokens x intermediate) tensor less per layer. The planner
counts it (training/plan.py), so 2B on an 80 GB card recomputes no layer: +5.5% there (docs/benchmarks.md,
2026-12-07, second lease). The benchmark's `-keepact` keeps it.
The idea is the one of unsloth's and axolotl's LoRA kernels (both Apache-2.0); this is a PyTorch version (Triton
only for the gated activation) with nothing model-specific beyond the sibling names and the MLP classes (those of
Gemma, Llama, Mistral, Qwen).

Used for a LoRA layer only when it is plain LoRA: one active adapter, no dropout, no DoRA, no trained bias, not
merged, its 4-bit weight in NF4's layout (not repacked by bitsandbytes for its CPU kernel). Any other state falls
back to peft's own forward at call time, so disabling adapters (as evaluation of the base does) or merging keeps
working. Under FSDP the recipe does not apply it (training/backends.py: load_hf).

FP8 (`fp8="backward"`: the config's `fp8_backward`, opt-in): the backward's product with the frozen base weight,
`dY W` (the input gradient), runs as an FP8 matmul (`torch._scaled_mm`, e4m3 with one scale per row of each operand:
per token for the gradient, per input column for the weight), at twice the bf16 rate on Ada and Hopper tensor cores.
The forward, the adapter's products and its gradients stay exact. The weight is re-quantised from its NF4 form at
each use, so memory is as without FP8. `fp8="all"` also runs the forward's `x W^T` in FP8: exploratory only (the
benchmark's `-fp8all`), since on SmolLM2's real weights it shifted the loss by ~3% while the backward alone kept the
curve within about 1%, e4m3's rounding noise (docs/benchmarks.md, "FP8"; tests/test_real_model.py).
"""

from __future__ import annotations

import types

import torch

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value
BASE_FIRST = False  # exploratory (scripts/benchmark.py -basefirst): the base product first, the adapter's added onto it
GROUPED = True  # sibling layers that read one input run as one function (GROUPS); off: scripts/benchmark.py -nogroup
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # by name, under one parent module
RECOMPUTE_ACT = True  # the MLP's gated activation recomputed in the backward, not kept (LoRA4bitGatedDown); off:
# scripts/benchmark.py -keepact
# MLPs whose forward is down_proj(act(gate_proj(x)) * up_proj(x)), by class name: their activation
# (training/gated_act.py KINDS), or "act_fn": the one their act_fn module computes (ACTIVATIONS, by class name).
GATED_MLPS = {"LigerGEGLUMLP": "gelu_tanh", "LigerSwiGLUMLP": "silu",
              **dict.fromkeys(("GemmaMLP", "Gemma2MLP", "Gemma3MLP", "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"),
                              "act_fn")}
ACTIVATIONS = {"GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "SiLUActivation": "silu", "SiLU": "silu"}
GATED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3")  # MLPs of GATED_MLPS
CONFIG_ACTIVATIONS = ("gelu_pytorch_tanh", "silu", "swish")  # config.json's hidden_act(ivation) that ACTIVATIONS covers
MLP_LAYERS = ("gate_proj", "up_proj", "down_proj")


def recomputes_activation(model_type: str, activation: str, cfg) -> bool:
    """Whether training will recompute the MLP's gated activation (LoRA4bitGatedDown) for a model of this type and
    activation (config.json's model_type and hidden_act / hidden_activation) under this config (fused_lora on, LoRA
    on gate, up and down without dropout, no FP8), which the memory planner counts on (training/plan.py)."""
    import re

    targets = cfg.target_modules
    on_mlp = targets == "all-linear" or all(re.fullmatch(targets, f"model.layers.0.mlp.{name}") for name in MLP_LAYERS)
    return (RECOMPUTE_ACT and not BASE_FIRST and cfg.fused_lora and not cfg.fp8_backward and not cfg.lora_dropout
            and on_mlp and model_type in GATED_MODEL_TYPES and activation in CONFIG_ACTIVATIONS)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t8, scale) with t ~= t8 * scale, one fp32 scale per row (amax / 448, at least 1e-12: an all-zero row stays
    zero), t8 in float8_e4m3fn; the division in fp32, so the one rounding is e4m3's."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / E4M3_MAX).clamp_(min=1e-12)
    t8 = (t.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return t8, scale


_compiled_quantize = None


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows, compiled on CUDA (one fused pass over t instead of five eager ones; any number of rows). If
    compiling fails (no working inductor/Triton here), the eager version, with a warning, once."""
    global _compiled_quantize
    if t.device.type != "cuda" or _compiled_quantize is False:
        return quantize_rows(t)
    if _compiled_quantize is None:
        _compiled_quantize = torch.compile(quantize_rows, dynamic=True)
    try:
        return _compiled_quantize(t)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: the same function, eager
        import logging

        logging.getLogger(__name__).warning("FP8 quantisation runs eager (slower): torch.compile failed: %s",
                                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _compiled_quantize = False
        return quantize_rows(t)


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b^T for a (m, k) and b (n, k) in `dtype`, as an FP8 matmul: each operand quantised with one scale per
    row, the product accumulated in fp32 and returned in `dtype`."""
    a8, a_scale = quantize(a)
    b8, b_scale = quantize(b)
    # _scaled_mm: the first operand row-major, the second column-major (b8 row-major, transposed)
    return torch._scaled_mm(a8.contiguous(), b8.contiguous().t(), scale_a=a_scale, scale_b=b_scale.reshape(1, -1),
                            out_dtype=dtype)


def fp8_supported(capability: tuple[int, int] | None) -> bool:
    """FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer; None: the CPU (emulated, for tests, no speed-up)."""
    return capability is None or capability >= (8, 9)


def fp8_shapes_ok(*dims: int) -> bool:
    """torch._scaled_mm wants the weight's dimensions (inner and outer of both products) multiples of 16."""
    return all(d % 16 == 0 for d in dims)


def _dequantize(weight, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, weight.quant_state).to(dtype)  # (out, in)


def _scaled(lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    wide = torch.promote_types(dtype, torch.float32)  # the scaling in fp32 (or wider), rounded once
    return (lora_b.to(wide) * scaling).to(dtype)


def _as(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A gradient in its parameter's dtype (None stays None)."""
    return None if grad is None else grad.to(dtype)


def _adapter_first(x2, xa, bs, weight, bias, dtype: torch.dtype) -> torch.Tensor:
    """(x A^T)(s B)^T (+ bias), then the base product accumulated onto it: x2 (tokens, in), xa = x2 A^T (tokens, r)."""
    out = xa @ bs.t() if bias is None else torch.addmm(bias.to(dtype), xa, bs.t())
    return out.addmm_(x2, _dequantize(weight, dtype).t())


class LoRA4bitMatmul(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (x A^T) B^T, with W stored in 4 bits (frozen), A and B trainable."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling: float, dtype: torch.dtype, fp8: str = "",
                base_first: bool = False):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a, bs = lora_a.to(dtype), _scaled(lora_b, scaling, dtype)
            xa = x2 @ a.t()  # (tokens, r)
            fp8 = fp8 if fp8 and fp8_shapes_ok(*weight.quant_state.shape) else ""
            if fp8 == "all" or base_first:  # the base product first (FP8's has no accumulating form)
                w = _dequantize(weight, dtype)  # W's FP8 scales per output row
                out = fp8_matmul(x2, w, dtype) if fp8 == "all" else x2 @ w.t()  # (tokens, out)
                if bias is not None:  # a pass of its own (Gemma-2 and the benchmark's rows have no bias)
                    out.add_(bias.to(dtype))
                out.addmm_(xa, bs.t())
            else:  # the adapter's product first, the base product accumulated onto it
                out = _adapter_first(x2, xa, bs, weight, bias, dtype)
        ctx.save_for_backward(x2, xa, a, bs)
        ctx.weight, ctx.scaling, ctx.dtype, ctx.fp8, ctx.base_first = weight, scaling, dtype, fp8, base_first
        ctx.x_shape, ctx.x_dtype, ctx.ab_dtypes = x.shape, x.dtype, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, a, bs = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (tokens, out)
            gb = g @ bs  # (tokens, r), scaled
            grad_a = gb.t() @ x2 if ctx.needs_input_grad[2] else None  # (r, in)
            grad_b = (g.t() @ xa).mul_(ctx.scaling) if ctx.needs_input_grad[3] else None  # (out, r)
            grad_x = None
            if ctx.needs_input_grad[0]:
                w = _dequantize(ctx.weight, dtype)
                if ctx.fp8 or ctx.base_first:  # FP8 ("backward" and "all"): W^T by rows, one scale per input column
                    grad_x = (fp8_matmul(g, w.t(), dtype) if ctx.fp8 else g @ w).addmm_(gb, a)
                else:
                    grad_x = (gb @ a).addmm_(g, w)
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None, _as(grad_a, ctx.ab_dtypes[0]), _as(grad_b, ctx.ab_dtypes[1]), None, None, None, None,
                None)


class LoRA4bitGroupMatmul(torch.autograd.Function):
    """The members of one group (GROUPS: q, k and v; gate and up), which read the same x: y_i = x W_i^T (+ bias_i) +
    s_i (x A_i^T) B_i^T, each as LoRA4bitMatmul computes it, with x read once where each member read it. The adapters'
    products with x are one matmul (x [A_1; A_2; ...]^T, inner dimension the input width, R = the sum of the ranks
    columns), and so are A's gradients ((dY_i B_i)_i^T x). The input gradient is one tensor that every member's
    matmuls accumulate onto in turn (dx = [dY_1 s_1 B_1, ...] [A_1; ...], then dx += dY_i W_i for each i) instead of
    one per member that autograd then sums: a pass over the (tokens x hidden) gradient saved per extra member. (That
    one tensor is in the compute dtype: with fp32 inputs, `fp32_norms_and_embeddings`, the members' terms are summed
    in bf16 where autograd summed them in fp32; with the default bf16 inputs the sum is the more exact of the two.)"""

    @staticmethod
    def forward(ctx, x, dtype: torch.dtype, scalings: tuple[float, ...], *params):
        weights, lora_as, lora_bs, biases = params[0::4], params[1::4], params[2::4], params[3::4]
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a = torch.cat([lora_a.to(dtype) for lora_a in lora_as])  # (R, in)
            bss = [_scaled(lora_b, s, dtype) for lora_b, s in zip(lora_bs, scalings)]
            xa = x2 @ a.t()  # (tokens, R)
            ranks = [lora_a.shape[0] for lora_a in lora_as]
            outs = []
            for weight, xa_i, bs, bias in zip(weights, xa.split(ranks, dim=1), bss, biases):
                out = _adapter_first(x2, xa_i, bs, weight, bias, dtype)
                outs.append(out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype))
        ctx.save_for_backward(x2, xa, a, *bss)
        ctx.weights, ctx.scalings, ctx.ranks, ctx.dtype = weights, scalings, ranks, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.ab_dtypes = [(lora_a.dtype, lora_b.dtype) for lora_a, lora_b in zip(lora_as, lora_bs)]
        ctx.set_materialize_grads(False)  # a member whose output took no part in the loss gets None
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x2, xa, a, *bss = ctx.saved_tensors
        dtype, need = ctx.dtype, ctx.needs_input_grad
        grads = []  # (member, its dY as (tokens, out)), for the members whose outputs got a gradient
        with torch.autocast(device_type=x2.device.type, enabled=False):
            gbs = []  # (tokens, r) per member, scaled; zero where the member got no gradient
            for i, (grad, bs) in enumerate(zip(grad_outs, bss)):
                if grad is None:
                    gbs.append(x2.new_zeros(x2.shape[0], ctx.ranks[i]))
                    continue
                g = grad.reshape(-1, grad.shape[-1]).to(dtype)
                grads.append((i, g))
                gbs.append(g @ bs)
            gb = torch.cat(gbs, dim=1)  # (tokens, R)
            a_needed = any(need[4 + 4 * i] for i in range(len(bss)))
            grad_as = list((gb.t() @ x2).split(ctx.ranks)) if a_needed else [None] * len(bss)  # (r, in) each
            for i, grad in enumerate(grad_outs):
                if grad is None:  # as autograd gives a layer whose output took no part: no gradient at all
                    grad_as[i] = None
            grad_bs: list[torch.Tensor | None] = [None] * len(bss)
            xas = xa.split(ctx.ranks, dim=1)
            for i, g in grads:
                if need[5 + 4 * i]:
                    grad_bs[i] = (g.t() @ xas[i]).mul_(ctx.scalings[i])  # (out, r)
            grad_x = None
            if need[0]:
                grad_x = gb @ a
                for i, g in grads:
                    grad_x.addmm_(g, _dequantize(ctx.weights[i], dtype))
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        per_member = []  # (weight, A, B, bias) per member
        for i, ((a_dtype, b_dtype), grad_a, grad_b) in enumerate(zip(ctx.ab_dtypes, grad_as, grad_bs)):
            per_member += [None, _as(grad_a, a_dtype) if need[4 + 4 * i] else None, _as(grad_b, b_dtype), None]
        return (grad_x, None, None, *per_member)


class LoRA4bitGatedDown(torch.autograd.Function):
    """y = c W^T (+ bias) + s (c A^T) B^T with c = act(a) * b: an MLP's gated activation (training/gated_act.py) and
    its down projection (LoRA on a 4-bit weight, as LoRA4bitMatmul computes it) in one function. It keeps a and b,
    which the activation's backward reads anyway, and not c (tokens x intermediate: 15 GiB over Gemma-2 2B's 26
    layers at 16 x 2048 tokens): the backward gets c back from the pass that computes a's and b's gradients, for A's
    gradient (c^T (dY s B)). Time: one more write of c per layer in the backward; on an H100 the memory it frees
    let 2B full rows recompute no layer, +5.5%, while the 24 GiB plans ran within 1% of keeping c."""

    @staticmethod
    def forward(ctx, a, b, kind: str, dtype: torch.dtype, scaling: float, weight, lora_a, lora_b, bias):
        from training import gated_act

        with torch.autocast(device_type=a.device.type, enabled=False):
            c = gated_act.forward(a, b, kind)
            x2 = c.reshape(-1, c.shape[-1]).to(dtype)
            la, bs = lora_a.to(dtype), _scaled(lora_b, scaling, dtype)
            xa = x2 @ la.t()  # (tokens, r)
            out = _adapter_first(x2, xa, bs, weight, bias, dtype)
        ctx.save_for_backward(a, b, xa, la, bs)
        ctx.kind, ctx.weight, ctx.scaling, ctx.dtype = kind, weight, scaling, dtype
        ctx.ab_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*a.shape[:-1], out.shape[-1]).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        from training import gated_act

        a, b, xa, la, bs = ctx.saved_tensors
        dtype, need = ctx.dtype, ctx.needs_input_grad
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (tokens, out)
            gb = g @ bs  # (tokens, r), scaled
            grad_b = (g.t() @ xa).mul_(ctx.scaling) if need[7] else None  # (out, r)
            dc = (gb @ la).addmm_(g, _dequantize(ctx.weight, dtype))  # (tokens, intermediate)
            c, grad_a_in, grad_b_in = gated_act.backward(a, b, dc.view(a.shape).to(a.dtype), ctx.kind)
            grad_a = gb.t() @ c.reshape(-1, c.shape[-1]).to(dtype) if need[6] else None  # (r, intermediate)
        return (grad_a_in, grad_b_in, None, None, None, None, _as(grad_a, ctx.ab_dtypes[0]),
                _as(grad_b, ctx.ab_dtypes[1]), None)


def _plain_adapter(module, kwargs) -> str | None:
    """The one active adapter when this call is plain LoRA (what the fused path computes), else None."""
    if module.disable_adapters or module.merged or kwargs or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    if not isinstance(module.lora_dropout[name], torch.nn.Identity) and module.training:
        return None
    base = module.base_layer
    if getattr(module, "lora_bias", {}).get(name) or (base.bias is not None and base.bias.requires_grad):
        return None  # a trained bias: peft's forward trains it
    if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        return None  # bitsandbytes repacked it for its CPU kernel (after a no-grad forward of its own): not NF4 now
    return name


def _compute_dtype(module, x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return getattr(module.base_layer, "compute_dtype", None) or x.dtype


def _layer_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args else _plain_adapter(self, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return LoRA4bitMatmul.apply(x, base.weight, self.lora_A[name].weight, self.lora_B[name].weight, base.bias,
                                float(self.scaling[name]), _compute_dtype(self, x), self._fp8, BASE_FIRST)


class _SharedInput:
    """One group's members (q, k and v under one attention; gate and up under one MLP). The first member called on
    an input computes every member's output (LoRA4bitGroupMatmul) and keeps the others' for them: the model calls
    them next on the same tensor. A member called on another tensor, or in a state the group does not compute
    (adapters off, merged, dropout, FP8, the exploratory switches), runs on its own. What is kept never outlives the
    parent module's forward; a model that leaves kept outputs untaken (a member not called, or called on another
    tensor: cross-attention, shared KV) gets its members run one by one from then on, with a warning."""

    def __init__(self, members: list, names: tuple[str, ...], parent: torch.nn.Module):
        self.members, self.enabled = members, True
        self.where = f"{', '.join(names)} of {type(parent).__name__}"
        self.pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None  # (input, outputs not yet taken)
        parent.register_forward_hook(self._parent_done)

    def _parent_done(self, module, args, output) -> None:
        self.drop()

    def drop(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None and self.enabled:
            import logging

            self.enabled = False
            logging.getLogger(__name__).warning(
                "fused LoRA: %s were not all called on one input (what one computed for the others went unused); "
                "they run one by one from now on", self.where)

    def __call__(self, index: int, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        pending = self.pending
        if pending is not None and pending[0] is x and index in pending[1]:
            out = pending[1].pop(index)
            if not pending[1]:
                self.pending = None
            return out
        self.drop()
        member = self.members[index]
        names = {_plain_adapter(m, kwargs) for m in self.members}
        if args or not self.enabled or not GROUPED or BASE_FIRST or member._fp8 or len(names) != 1 or None in names:
            return _layer_forward(member, x, *args, **kwargs)
        name = names.pop()
        params = []
        for m in self.members:
            params += [m.base_layer.weight, m.lora_A[name].weight, m.lora_B[name].weight, m.base_layer.bias]
        outs = LoRA4bitGroupMatmul.apply(x, _compute_dtype(member, x), tuple(float(m.scaling[name])
                                                                            for m in self.members), *params)
        self.pending = (x, {i: out for i, out in enumerate(outs) if i != index})
        return outs[index]


def _gated_kind(module) -> str | None:
    """The gated activation of an MLP that GATED_MLPS knows (training/gated_act.py KINDS), else None."""
    kind = GATED_MLPS.get(type(module).__name__)
    return ACTIVATIONS.get(type(getattr(module, "act_fn", None)).__name__) if kind == "act_fn" else kind


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down_proj(act(gate_proj(x)) * up_proj(x)), the activation and down_proj as one function (LoRA4bitGatedDown)
    where down_proj is plain LoRA; else the module's own forward. (RECOMPUTE_ACT, BASE_FIRST and FP8 are read once,
    by apply_fused_lora, which patches an MLP only where they allow it.)"""
    down = self.down_proj
    name = _plain_adapter(down, {}) if hasattr(down, "lora_A") else None  # peft's unload() leaves the base layer
    if name is None:
        return type(self).forward(self, x)
    a, b = self.gate_proj(x), self.up_proj(x)
    base = down.base_layer
    return LoRA4bitGatedDown.apply(a, b, self._gated_act, _compute_dtype(down, a), float(down.scaling[name]),
                                   base.weight, down.lora_A[name].weight, down.lora_B[name].weight, base.bias)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self._group is None:
        return _layer_forward(self, x, *args, **kwargs)
    return self._group[0](self._group[1], x, args, kwargs)


def apply_fused_lora(model, fp8: str = "") -> tuple[int, int, int]:
    """Route every peft LoRA layer on a bitsandbytes 4-bit linear through the fused function ("backward": its input
    gradient's base product in FP8; "all": the forward's too), the siblings of GROUPS that read one input through
    the group function, and the gated MLPs of GATED_MLPS through LoRA4bitGatedDown; returns (layers, groups, MLPs).
    (A gated MLP calls down_proj's weights, not the module: hooks on down_proj itself do not run.)"""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes support: nothing to fuse
        return 0, 0, 0
    layers = groups = mlps = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit):
            module.forward = types.MethodType(_fused_forward, module)
            module._fp8, module._group = fp8, None
            layers += 1
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, LoraLinear4bit) for m in members) and \
                    len({m.base_layer.in_features for m in members}) == 1:
                group = _SharedInput(members, names, parent)
                for index, member in enumerate(members):
                    member._group = (group, index)
                groups += 1
        kind = _gated_kind(parent)
        if kind and RECOMPUTE_ACT and not BASE_FIRST and not fp8 and \
                all(isinstance(getattr(parent, n, None), LoraLinear4bit) for n in MLP_LAYERS):
            parent.forward = types.MethodType(_gated_mlp_forward, parent)
            parent._gated_act = kind
            mlps += 1
    return layers, groups, mlps
