"""training.optim.FlatAdamW8bit against bitsandbytes' own 8-bit AdamW, both real, on the CPU."""
import io

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

from training.optim import FlatAdamW8bit

pytestmark = pytest.mark.usefixtures("bnb_warm")  # bit-for-bit comparisons: bitsandbytes' kernel called once first

# 8-bit moments from 4,096 elements: a multiple of the 256-element block, two that are not (the pads), and one under
# 4,096 (bitsandbytes keeps 32-bit moments for it: the per-tensor path, in the same group)
SHAPES = [(64, 64), (33, 129), (16, 300), (10, 10)]


def pair(dtype):
    """The same parameters, twice, in two groups (with and without weight decay, as the Trainer makes them)."""
    torch.manual_seed(0)
    per = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES + [(4096, 2)]]
    flat = [torch.nn.Parameter(p.detach().clone()) for p in per]

    def groups(ps):
        return [{"params": ps[:4], "weight_decay": 0.1}, {"params": ps[4:], "weight_decay": 0.0}]
    return per, flat, bnb.optim.AdamW(groups(per), lr=1e-2, optim_bits=8), FlatAdamW8bit(groups(flat), lr=1e-2)


def train(steps, *runs, seed=0):
    torch.manual_seed(seed)  # the same gradients for every run
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in runs[0][0]]
        for params, opt in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            opt.zero_grad()


def through_a_file(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(same_state(x, y) if isinstance(x, dict) else torch.equal(x, y) if torch.is_tensor(x) else x == y
               for x, y in zip(a.values(), (b[k] for k in a)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the adapters' dtype on the CPU; under TRL on GPU
def test_flat_8bit_adamw_is_bitsandbytes_own_bit_for_bit_in_one_launch_per_group(dtype, monkeypatch):
    """Three steps leave weights and moments exactly where bitsandbytes' per-tensor 8-bit AdamW leaves them, with
    one 8-bit kernel launch per group and step; each checkpoint resumes in the other optimizer, bit for bit."""
    per, flat, per_opt, flat_opt = pair(dtype)
    start = [p.detach().clone() for p in flat]
    launches = []
    update = F.optimizer_update_8bit_blockwise
    monkeypatch.setattr(F, "optimizer_update_8bit_blockwise", lambda *a, **k: launches.append(1) or
                        update(*a, **k))
    train(3, (flat, flat_opt))
    assert len(launches) == 2 * 3  # one per group and step (bitsandbytes: one per tensor, 4 per step)
    monkeypatch.setattr(F, "optimizer_update_8bit_blockwise", update)
    train(3, (per, per_opt))
    assert not any(torch.equal(a, b) for a, b in zip(flat, start))  # the weights moved
    assert all(torch.equal(a, b) for a, b in zip(per, flat))
    assert all(p.grad is None for p in flat)
    saved_per, saved_flat = through_a_file(per_opt.state_dict()), through_a_file(flat_opt.state_dict())
    assert same_state(saved_per, saved_flat)  # the checkpoint is bitsandbytes' own
    per_opt.load_state_dict(saved_flat)
    flat_opt.load_state_dict(saved_per)
    train(2, (per, per_opt), (flat, flat_opt), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(per, flat))
    assert same_state(per_opt.state_dict(), flat_opt.state_dict())
    # The pads after each tensor's last element must hold moments of (about) zero, or a block's scale could come from
    # them. Fresh moments have scale 0 whatever their codes, so only a loaded state can show it, and rarely in the
    # weights (code 0 of the signed map is -0.993: under the block's largest element): checked here. bitsandbytes
    # codes a zero moment near zero, not at it (2.1e-5 and 1.6e-5 of the block's scale, on the CPU).
    flat_part = flat_opt._flat[0]  # the group with the two tensors that are no multiple of the block
    qmap1, qmap2 = flat_opt.state[flat_part.params[0]]["qmap1"], flat_opt.state[flat_part.params[0]]["qmap2"]
    pads = torch.ones(flat_part.numel, dtype=torch.bool)
    for v in flat_part.views(pads):
        v.fill_(False)
    assert pads.sum() == (256 - 33 * 129 % 256) + (256 - 16 * 300 % 256)
    for codes, qmap in ((flat_part.state1, qmap1), (flat_part.state2, qmap2)):  # a code's value is its share of the block's scale
        assert (qmap[codes.long()][pads].abs() <= 1e-4).all()


def test_a_tensor_without_a_gradient_is_an_error_not_a_silent_zero():
    """bitsandbytes skips a tensor that got no gradient; one launch over the group cannot, and must not pretend its
    gradient was zero (its moments would decay and its weights move)."""
    _, flat, _, opt = pair(torch.float32)
    for p in (flat[0], flat[1], flat[3]):  # flat[2], in the flat buffer, gets none
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="1 of 3 trainable tensors got no gradient.*--set optim=paged_adamw_8bit"):
        opt.step()
    with pytest.raises(ValueError, match="is_paged=False"):
        FlatAdamW8bit(flat, is_paged=True)


def test_a_tensor_with_a_per_parameter_override_keeps_bitsandbytes_per_tensor_path():
    """bitsandbytes' GlobalOptimManager overrides (here 32-bit moments for one tensor) hold as in its own optimizer."""
    per, flat, per_opt, flat_opt = pair(torch.float32)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    try:
        for p in (per[0], flat[0]):
            manager.override_config(p, "optim_bits", 32)
        train(2, (per, per_opt), (flat, flat_opt))
        assert flat_opt.state[flat[0]]["state1"].dtype == torch.float32
        assert flat_opt.state[flat[1]]["state1"].dtype == torch.uint8
        assert all(torch.equal(a, b) for a, b in zip(per, flat))
    finally:  # the manager is process-wide, keyed by id(): a later test's tensor could reuse one
        manager.pid2config.clear()
        manager.index2config.clear()
