"""Per-resblock gradient scaling (App. D): the update rules, overflow isolation, the fp16 underflow it exists to
prevent, and its composition with the prior and activation checkpointing. Plain PyTorch on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megadalle.engine.grad_scaler import PerBlockScaler, ScalerRules, apply_grad_scaler, resblocks
from megadalle.engine.wrap import apply_activation_checkpointing
from megadalle.models.transformer import DallePrior, PriorArgs, call_block

A = PriorArgs(n_layers=2, d_model=32, n_heads=2, text_len=4, text_vocab=40, grid=3, image_vocab=16, conv_kernel=3)


def _events(scaler: PerBlockScaler, events: list[list[bool]]) -> list[list[float]]:
    out = []
    for overflow in events:
        scaler.update(torch.tensor(overflow))
        out.append(scaler.log2_scales.tolist())
    return out


def test_update_rules_growth_division_window_and_clamps():
    s = PerBlockScaler(2, replicas=4)  # M = 4: log2 scales start at 2 + 13
    assert s.log2_scales.tolist() == [15.0, 15.0]
    got = _events(s, [[False, False], [True, False], [True, False], [False, True]])
    g = 1 / 1000
    assert got[0] == pytest.approx([15 + g, 15 + g])  # both finite: both grow
    assert got[1] == pytest.approx([15 + g - 0.5, 15 + g])  # block 0 overflows: / sqrt(2), nobody grows
    assert got[2] == pytest.approx([15 + g - 0.5, 15 + g])  # again within 125 updates: no second division
    assert got[3] == pytest.approx([15 + g - 0.5, 15 + g - 0.5])  # block 1's first division
    assert s.skips.tolist() == [2, 1] and s.skipped_updates == 3 and s.updates == 4
    for _ in range(122):  # block 0 divided at update 1: a second division is allowed from update 126 on
        s.update(torch.tensor([False, False]))
    assert s.updates == 126
    before = float(s.log2_scales[0])
    s.update(torch.tensor([True, False]))
    assert float(s.log2_scales[0]) == pytest.approx(before - 0.5)
    low = PerBlockScaler(1, replicas=4, rules=ScalerRules(init_log2=7.2))
    _events(low, [[True]])
    assert float(low.log2_scales[0]) == 2 + 7  # clamped at M * 2^7
    high = PerBlockScaler(1, replicas=4, rules=ScalerRules(init_log2=24 - 0.0005))
    _events(high, [[False]])
    assert float(high.log2_scales[0]) == 2 + 24  # clamped at M * 2^24


def test_state_round_trip():
    s = PerBlockScaler(3)
    _events(s, [[False, True, False], [False, False, False]])
    t = PerBlockScaler(3)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.log2_scales, s.log2_scales) and torch.equal(t.last_division, s.last_division)
    assert (t.updates, t.skipped_updates, t.skips.tolist()) == (2, 1, [0, 1, 0])
    with pytest.raises(ValueError, match="3 scales"):
        PerBlockScaler(4).load_state_dict(s.state_dict())


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, A.text_vocab, (2, A.text_len), generator=g), torch.randint(0, 16, (2, 9), generator=g)


def _others(model: nn.Module) -> list[nn.Parameter]:
    inside = {id(p) for b in resblocks(model) for p in b.parameters()}  # a set for membership, not a cache
    return [p for p in model.parameters() if id(p) not in inside]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_scaled_gradients_equal_plain_ones_after_unscaling(checkpointing):
    """fp32: the scaler changes nothing but rounding (scales are not powers of two)."""
    text, image = _batch()
    torch.manual_seed(0)
    plain = DallePrior(A)
    plain(text, image).loss.backward()
    torch.manual_seed(0)
    model = DallePrior(A)
    if checkpointing:
        apply_activation_checkpointing(model)
    scaler = apply_grad_scaler(model)
    with torch.no_grad():
        scaler.log2_scales += torch.arange(scaler.n_blocks, dtype=torch.float64) * 0.37  # distinct scales
    model(text, image).loss.backward()
    assert not scaler.step(resblocks(model), _others(model))
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_an_inf_in_one_block_drops_only_its_scale_and_skips_the_update():
    text, image = _batch()
    torch.manual_seed(0)
    model = DallePrior(A)
    scaler = apply_grad_scaler(model)
    blocks = resblocks(model)
    bad = 2  # the second layer's attention block
    original = blocks[bad].branch

    def poisoned(x: torch.Tensor) -> torch.Tensor:
        y = original(x)
        y.register_hook(lambda g: g * float("inf"))  # the gradient entering this branch overflows
        return y

    blocks[bad].branch = poisoned
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scales = scaler.log2_scales.clone()
    model(text, image).loss.backward()
    assert bool(scaler.flags[bad]) and int(scaler.flags.sum()) == 1  # recorded where it happened, only there
    for i, block in enumerate(blocks[:bad]):  # the filter kept the Inf from the blocks before it
        assert all(torch.isfinite(p.grad).all() for p in block.parameters()), i
    skip = scaler.step(blocks, _others(model))
    assert skip and scaler.skips.tolist() == [int(i == bad) for i in range(len(blocks))]
    assert torch.equal(scaler.log2_scales != scales, torch.arange(len(blocks)) == bad)
    assert float(scaler.log2_scales[bad]) == pytest.approx(float(scales[bad]) - 0.5)
    opt.zero_grad()  # the training loop's skip: no optimizer step
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and torch.isfinite(p).all(), n
    assert not opt.state  # no moments were touched
    assert not scaler.flags.any()  # cleared for the next backward


class _Half(nn.Module):
    """A resblock x + gain * W x with W in fp16, the identity path in fp32 (as App. D keeps it)."""

    def __init__(self, d: int, gain: float, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
        self.lin.half()
        self.gain = gain

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x.half()) * self.gain).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class _Layer(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def resblocks(self) -> tuple[nn.Module]:
        return (self.block,)


class _Stack(nn.Module):
    """Early blocks with large gradients, late ones with tiny gradients: the spread of Fig. 4's motivation."""

    def __init__(self, gains: list[float]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(_Half(16, g, i)) for i, g in enumerate(gains)])
        self.run_block = call_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            for block in layer.resblocks():
                x = self.run_block(block, x)
        return x


def _largest_finite(run, log2_range) -> float:
    """The largest log2 scale in `log2_range` (descending) whose backward stays finite."""
    for k in log2_range:
        grads = run(float(2.0**k))
        if all(torch.isfinite(g).all() for g in grads):
            return k
    raise AssertionError("no finite scale")


def test_per_block_scales_keep_late_block_gradients_that_one_global_scale_flushes_to_zero():
    gains = [64.0, 1.0, 1e-8, 1e-10]
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    top = 1e-3  # d loss / d out

    def global_run(scale: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = _Stack(gains)
        (model(x) * (top * scale)).sum().backward()
        return [b.lin.weight.grad.float() / scale for b in resblocks(model)]

    k = _largest_finite(global_run, range(24, -1, -1))  # one scale: limited by the early block's gradients
    zeros_global = [int((g == 0).sum()) for g in global_run(float(2.0**k))]

    model = _Stack(gains)
    scaler = apply_grad_scaler(model)
    for i in range(len(gains)):  # each block at the largest scale its own gradients allow (the rules' fixed point)

        def block_run(scale: float, i: int = i) -> list[torch.Tensor]:
            scaler.log2_scales[i] = math.log2(scale)
            for p in model.parameters():
                p.grad = None
            (model(x) * top).sum().backward()
            scaler.flags.zero_()
            return [model.layers[i].block.lin.weight.grad]

        scaler.log2_scales[i] = _largest_finite(block_run, range(24, -1, -1))
    for p in model.parameters():
        p.grad = None
    (model(x) * top).sum().backward()
    zeros_block = [int((b.lin.weight.grad == 0).sum()) for b in resblocks(model)]  # the fp16 (scaled) gradients
    assert not scaler.update(scaler.unscale_and_check(resblocks(model), [], unscale=False))
    with pytest.raises(ValueError, match="fp32 master gradient"):  # dividing fp16 in place would flush them again
        scaler.unscale_and_check(resblocks(model), [])
    assert zeros_global[-1] > 128 and zeros_global[0] == 0, zeros_global  # the late block's gradient flushed
    assert zeros_block == [0] * len(gains), zeros_block
    assert scaler.log2_scales[-1] > k + 8  # the late block runs at a far larger scale than the global one
