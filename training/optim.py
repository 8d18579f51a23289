"""The recipe's 8-bit AdamW: bitsandbytes' kernel run once per parameter group instead of once per tensor.

bitsandbytes' 8-bit AdamW updates one tensor at a time and synchronises the GPU after each: on Gemma-2-2B's 364 LoRA
tensors that is 364 launches and 364 host-device syncs per optimizer step. `FlatAdamW8bit` gathers a group's
gradients and weights into one flat buffer, runs the same kernel once over it and copies the weights back.

Each tensor's segment starts on a 256-element block (bitsandbytes' block for 8-bit moments), and the rest of its last
block is pads: zero gradients, and moments that start at zero and stay at bitsandbytes' coding of zero (within
1e-4 of the block's scale), so they never set a block's scale. Every block and its scale are the per-tensor ones,
and the update is bitsandbytes' own, bit for bit (tested on the CPU). The moments live per parameter as views into
the flat buffers, in bitsandbytes' format: the checkpoint's optimizer.pt is the one `bnb.optim.AdamW(optim_bits=8)`
writes, and either optimizer resumes the other's. Tensors under `min_8bit_size` (bitsandbytes keeps 32-bit moments
for those), in a group's less common dtype, or with a per-parameter override (bitsandbytes' GlobalOptimManager) keep
its per-tensor path. Transformers' Trainer registers such an override (32-bit moments) for trainable embeddings only
when the optimizer is bitsandbytes' own; the recipe trains none. The gathered gradients and weights (twice the
group's trainable size) live only during the step, after the backward pass has freed the activations.
"""
from __future__ import annotations

from itertools import accumulate

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

BLOCK = 256  # bitsandbytes' block for 8-bit optimizer moments (hard-coded in Optimizer2State.init_state too)
PER_TENSOR = "--set optim=paged_adamw_8bit (bitsandbytes' own 8-bit AdamW, one tensor at a time)"


class _Flat:
    """One group's flat layout: the tensors in it, where each starts (block-aligned), and their moments."""

    def __init__(self, params: list[torch.Tensor], indices: list[int]):
        self.params, self.indices = params, indices
        self.sizes = [p.numel() for p in params]
        self.blocks = [-(-n // BLOCK) for n in self.sizes]
        self.starts = [BLOCK * b for b in accumulate(self.blocks, initial=0)][:-1]
        self.numel = BLOCK * sum(self.blocks)
        self.dtype, self.device = params[0].dtype, params[0].device
        self.state1 = self.state2 = self.absmax1 = self.absmax2 = None  # FlatAdamW8bit._move_moments_into

    def views(self, buf: torch.Tensor, per_block: bool = False) -> list[torch.Tensor]:
        """Each tensor's part of a flat buffer, shaped as the tensor (per_block: of a buffer of one value per block)."""
        if per_block:
            return list(buf.split(self.blocks))
        return [buf[s:s + n].view(p.shape) for s, n, p in zip(self.starts, self.sizes, self.params)]

    def gather(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        buf = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        torch._foreach_copy_(self.views(buf), tensors)
        return buf


class FlatAdamW8bit(bnb.optim.AdamW):
    """bitsandbytes' 8-bit AdamW (`optim=adamw_8bit`), one kernel launch per parameter group. Takes the arguments
    `bnb.optim.AdamW` takes (the Trainer's for adamw_8bit); paged moments are not supported."""

    def __init__(self, params, **kwargs):
        kwargs = {"optim_bits": 8, **kwargs}
        if kwargs["optim_bits"] != 8 or kwargs.get("is_paged"):
            raise ValueError("FlatAdamW8bit runs 8-bit moments in device memory: use optim_bits=8 and is_paged=False "
                             "(or bitsandbytes' own optimizer for other settings)")
        super().__init__(params, **kwargs)
        self._flat: dict[int, _Flat | None] = {}  # by group index; made at the first step, again after a load

    def load_state_dict(self, state_dict, move_to_device=True):
        super().load_state_dict(state_dict, move_to_device)
        self._flat = {}  # the loaded moments are per tensor: gathered into flat buffers at the next step

    def _layout(self, gindex: int, group: dict) -> _Flat | None:
        """The group's flat layout, its moments in flat buffers and self.state[p] viewing them (made once)."""
        if gindex in self._flat:
            return self._flat[gindex]
        by_kind: dict = {}
        for i, p in enumerate(group["params"]):
            overridden = (gindex, i) in self.mng.index2config or id(p) in self.mng.pid2config
            if p.numel() >= self.args.min_8bit_size and not overridden:
                by_kind.setdefault((p.dtype, p.device), []).append((i, p))
        # one flat buffer per group: its most common dtype and device; any other tensor keeps the per-tensor path
        chosen = max(by_kind.values(), key=len, default=[])
        flat = _Flat([p for _, p in chosen], [i for i, _ in chosen]) if chosen else None
        if flat is not None:
            self._move_moments_into(flat)
        self._flat[gindex] = flat
        return flat

    @torch.no_grad()
    def _move_moments_into(self, flat: _Flat) -> None:
        """Flat buffers for the moments, filled from the per-tensor state where there is one (a loaded checkpoint),
        and self.state[p] pointed at views of them."""
        states = [self.state[p] for p in flat.params]
        loaded = [s for s in states if s]
        if loaded and len(loaded) != len(states):
            raise RuntimeError(f"the optimizer state holds moments for {len(loaded)} of {len(states)} tensors of a "
                               "parameter group: it does not belong to this model's trainable parameters")
        if any(s["state1"].dtype != torch.uint8 for s in loaded):
            raise RuntimeError("the optimizer state has 32-bit moments where this optimizer keeps 8-bit ones: resume "
                               "it with the optimizer that wrote it (--set optim=...)")
        steps = {s["step"] for s in loaded} or {0}
        if len(steps) > 1:
            raise RuntimeError(f"the optimizer state's tensors are at different steps ({sorted(steps)}), which one "
                               f"launch per group cannot update: resume it with {PER_TENSOR}")
        qmap1, qmap2 = (self.name2qmap[k].to(flat.device) for k in ("dynamic", "udynamic"))
        zero1, zero2 = (int((q == 0).nonzero()[0]) for q in (qmap1, qmap2))  # codes of 0.0: where the pads start
        flat.state1 = torch.full((flat.numel,), zero1, dtype=torch.uint8, device=flat.device)
        flat.state2 = torch.full((flat.numel,), zero2, dtype=torch.uint8, device=flat.device)
        flat.absmax1, flat.absmax2 = (torch.zeros(flat.numel // BLOCK, device=flat.device) for _ in range(2))
        if loaded:
            for key in ("state1", "state2"):
                torch._foreach_copy_(flat.views(getattr(flat, key)), [s[key].to(flat.device) for s in loaded])
            for key in ("absmax1", "absmax2"):
                torch._foreach_copy_(flat.views(getattr(flat, key), per_block=True),
                                     [s[key].to(flat.device) for s in loaded])
        else:  # bitsandbytes' fresh moments: code 0 with scale 0 (zero); the pads take the code of 0.0 itself
            for v in flat.views(flat.state1) + flat.views(flat.state2):
                v.zero_()
        step = steps.pop()
        blocks1, blocks2 = flat.views(flat.absmax1, per_block=True), flat.views(flat.absmax2, per_block=True)
        for p, s1, s2, a1, a2 in zip(flat.params, flat.views(flat.state1), flat.views(flat.state2), blocks1, blocks2):
            self.state[p] = {"step": step, "state1": s1, "state2": s2, "qmap1": qmap1, "qmap2": qmap2,
                             "absmax1": a1, "absmax2": a2}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            if all(p.grad is None for p in group["params"]):
                continue  # as bitsandbytes: no state for tensors that never got a gradient
            flat = self._layout(gindex, group)
            in_flat = set(flat.indices) if flat is not None else set()
            for pindex, p in enumerate(group["params"]):  # bitsandbytes' per-tensor path for the rest
                if pindex in in_flat or p.grad is None:
                    continue
                if not self.state[p]:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
            if flat is not None:
                self._flat_step(flat, group, gindex)
        return loss

    def _flat_step(self, flat: _Flat, group: dict, gindex: int) -> None:
        grads = [p.grad for p in flat.params]
        if all(g is None for g in grads):
            return
        if any(g is None for g in grads):  # bitsandbytes would skip those tensors: one launch cannot
            missing = sum(g is None for g in grads)
            raise RuntimeError(f"{missing} of {len(grads)} trainable tensors got no gradient this step, which one "
                               f"launch per group cannot skip: train this model with {PER_TENSOR}")
        config = self.get_config(gindex, flat.indices[0], group)  # the group's: no tensor in it has an override
        step = self.state[flat.params[0]]["step"] + 1
        weights, first = flat.gather([p.data for p in flat.params]), self.state[flat.params[0]]
        beta1, beta2 = config["betas"]
        F.optimizer_update_8bit_blockwise(  # bitsandbytes' Optimizer2State.update_step, for AdamW, on the flat buffers
            self.optimizer_name, g=flat.gather(grads), p=weights, state1=flat.state1, state2=flat.state2, beta1=beta1,
            beta2=beta2, beta3=0.0, alpha=0.0, eps=config["eps"], step=step, lr=config["lr"], qmap1=first["qmap1"],
            qmap2=first["qmap2"], absmax1=flat.absmax1, absmax2=flat.absmax2, weight_decay=config["weight_decay"],
            gnorm_scale=1.0, skip_zeros=config["skip_zeros"])
        torch._foreach_copy_([p.data for p in flat.params], flat.views(weights))
        for p in flat.params:
            self.state[p]["step"] = step


def optimizer_cls_and_kwargs(args) -> tuple[type, dict] | None:
    """What the recipe hands the Trainer for its optimizer (`optimizer_cls_and_kwargs`): for `optim=adamw_8bit`,
    FlatAdamW8bit with the arguments the Trainer gives bitsandbytes' AdamW; None (the Trainer's own) otherwise, and
    under FSDP, whose sharded parameters and optimizer state bitsandbytes' own optimizer handles."""
    from training.distributed import fsdp_enabled

    if args.optim != "adamw_8bit" or fsdp_enabled():
        return None
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is bnb.optim.AdamW and kwargs.get("optim_bits") == 8, (cls, kwargs)  # what FlatAdamW8bit stands for
    return FlatAdamW8bit, kwargs
