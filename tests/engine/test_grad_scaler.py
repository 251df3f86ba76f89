"""Per-resblock gradient scaling (App. D): the update rules, overflow isolation, the fp16 underflow it exists to
prevent, and its composition with the prior and activation checkpointing. Plain PyTorch on the CPU (DeepSpeed's
side: test_grad_scaler_zero3.py)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megadalle.engine.grad_scaler import (
    PerBlockScaler,
    ScalerRules,
    apply_grad_scaler,
    outside_parameters,
    resblocks,
)
from megadalle.engine.wrap import apply_activation_checkpointing
from megadalle.models.transformer import DallePrior, PriorArgs, plain_residual

A = PriorArgs(n_layers=2, d_model=32, n_heads=2, text_len=4, text_vocab=40, grid=3, image_vocab=16, conv_kernel=3)
G = 1 / 1000  # log2 growth per applied update


def _events(scaler: PerBlockScaler, events: list[list[bool]]) -> list[list[float]]:
    """Each event: which blocks overflowed, then (the last entry) whether the outside parameters did."""
    out = []
    for overflow in events:
        scaler.update(torch.tensor(overflow[:-1]), outside=overflow[-1])
        out.append(scaler.log2_scales.tolist())
    return out


def test_update_rules_growth_division_and_clamps() -> None:
    s = PerBlockScaler(2)  # log2 scales (2 blocks, then outside) start at 13 at any world size (App. D's M x 2^13
    assert s.log2_scales.tolist() == [13.0, 13.0, 13.0] and s.loss_scale == 2.0**13  # on a global-batch loss)
    got = _events(s, [[False, False, False], [True, False, False], [True, False, False], [False, True, True]])
    assert got[0] == pytest.approx([13 + G] * 3)  # all finite: all grow
    assert got[1] == pytest.approx([13 + G - 0.5, 13 + G, 13 + G])  # block 0 overflows: / sqrt(2), nobody grows
    assert got[2] == pytest.approx([13 + G - 0.5, 13 + G, 13 + G])  # again within 125 updates: no second division
    assert got[3] == pytest.approx([13 + G - 0.5, 13 + G - 0.5, 13 + G - 0.5])  # block 1 and outside: divided
    assert s.skips.tolist() == [2, 1, 1] and s.skipped_updates == 3 and s.updates == 4
    low = PerBlockScaler(1, rules=ScalerRules(init_log2=7.2))
    _events(low, [[True, True]])
    assert low.log2_scales.tolist() == [7, 7]  # clamped at 2^7
    high = PerBlockScaler(1, rules=ScalerRules(init_log2=24 - 0.0005))
    _events(high, [[False, False]])
    assert high.log2_scales.tolist() == [24, 24]  # clamped at 2^24


def test_the_125_update_window_counts_attempts_both_sides() -> None:
    s = PerBlockScaler(1)
    s.update(torch.tensor([True]))  # attempt 0: divided
    for _ in range(123):  # attempts 1..123
        s.update(torch.tensor([False]))
    at_124 = float(s.log2_scales[0])
    s.update(torch.tensor([True]))  # attempt 124: 124 after the division, still inside the window
    assert float(s.log2_scales[0]) == at_124
    s.update(torch.tensor([True]))  # attempt 125: the window is over
    assert float(s.log2_scales[0]) == pytest.approx(at_124 - 0.5)
    assert s.skips.tolist() == [3, 0]  # the outside scale was never involved


def test_an_overflow_outside_the_resblocks_divides_only_the_outside_scale() -> None:
    s = PerBlockScaler(3)
    before = s.log2_scales.clone()
    assert s.update(torch.zeros(3, dtype=torch.bool), outside=True)
    assert torch.equal(s.log2_scales[:3], before[:3]) and float(s.log2_scales[3]) == float(before[3]) - 0.5
    assert s.skipped_updates == 1 and s.skips.tolist() == [0, 0, 0, 1]


def test_state_round_trip() -> None:
    s = PerBlockScaler(3)
    _events(s, [[False, True, False, False], [False, False, False, False]])
    t = PerBlockScaler(3)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.log2_scales, s.log2_scales) and torch.equal(t.last_division, s.last_division)
    assert (t.updates, t.skipped_updates, t.skips.tolist()) == (2, 1, [0, 1, 0, 0])
    with pytest.raises(ValueError, match="3 resblock scales"):
        PerBlockScaler(4).load_state_dict(s.state_dict())
    assert t.load_state_dict(s.state_dict())
    # a state saved when the scales carried App. D's M on a backward divided by the accumulation count: that count
    # is not in it, so the scales restart at 2^13 (counters kept) and the caller is told (train.py warns)
    legacy = {**s.state_dict(), "log2_scales": s.log2_scales + 2, "replicas": 4}
    del legacy["per_micro_batch_mean"]
    assert not t.load_state_dict(legacy)
    assert t.log2_scales.tolist() == [13.0] * 4 and t.last_division.tolist() == [-(10**9)] * 4
    assert (t.updates, t.skipped_updates, t.skips.tolist()) == (2, 1, [0, 1, 0, 0])


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, A.text_vocab, (2, A.text_len), generator=g), torch.randint(0, 16, (2, 9), generator=g)


def _reference_and_twin() -> tuple[torch.Tensor, torch.Tensor, DallePrior, DallePrior]:
    """A batch, a plain fp32 prior holding its gradients for it, and an untouched twin (same initial weights)."""
    text, image = _batch()
    torch.manual_seed(0)
    plain = DallePrior(A)
    plain(text, image).loss.backward()
    torch.manual_seed(0)
    return text, image, plain, DallePrior(A)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_are_scaled_per_block_and_unscale_to_the_plain_ones(checkpointing: bool) -> None:
    text, image, plain, model = _reference_and_twin()
    if checkpointing:
        apply_activation_checkpointing(model)
    scaler = apply_grad_scaler(model)
    scaler.log2_scales += torch.arange(scaler.n_blocks + 1, dtype=torch.float64) * 0.37  # distinct scales
    scaler.scale_loss(model(text, image).loss).backward()
    ref = dict(plain.named_parameters())
    for i, block in enumerate(resblocks(model)):  # before unscaling: each block's gradients carry its own scale
        for n, p in block.named_parameters():
            q, s = ref[_name(model, p)], scaler.scale(i)
            torch.testing.assert_close(p.grad, q.grad * s, rtol=1e-5, atol=1e-7 * s, msg=n)
    for p in outside_parameters(model):  # the embeddings, final norm and heads carry the loss scale
        q, s = ref[_name(model, p)], scaler.loss_scale
        torch.testing.assert_close(p.grad, q.grad * s, rtol=1e-5, atol=1e-7 * s, msg=_name(model, p))
    assert not scaler.step(resblocks(model), outside_parameters(model))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-5, atol=1e-7, msg=n)


def _name(model: nn.Module, param: nn.Parameter) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def test_fp16_resblocks_with_an_fp32_identity_path_match_fp32() -> None:
    """The prior's own blocks in fp16 (fp32 stream, embeddings and heads): the scaled fp16 gradients, divided in
    fp32, match the fp32 model's; an fp16 stream is upcast to fp32 at the first block (App. D)."""
    text, image, ref, model = _reference_and_twin()
    for block in resblocks(model):
        block.half()
    scaler = apply_grad_scaler(model)
    scaler.scale_loss(model(text, image).loss).backward()
    overflow, outside = scaler.unscale_and_check(resblocks(model), outside_parameters(model), unscale=False)
    assert not overflow.any() and not outside
    refs = dict(ref.named_parameters())
    for i, block in enumerate(resblocks(model)):
        for p in block.parameters():
            assert p.grad.dtype == torch.float16
            want = refs[_name(model, p)].grad
            got = p.grad.float() / scaler.scale(i)
            assert (got - want).norm() <= 0.01 * want.norm(), _name(model, p)  # fp16 rounding, no flushed blocks
    with pytest.raises(ValueError, match="fp32 master gradient"):
        scaler.unscale_and_check(resblocks(model), [])
    half = DallePrior(A).half()  # everything fp16 (as an fp16 engine stores it): the stream is upcast to fp32
    apply_grad_scaler(half)
    streams = []
    half.layers[-1].mlp.register_forward_hook(lambda m, inp, out: streams.append(out.dtype))
    assert torch.isfinite(half(text, image).loss) and streams == [torch.float32]


def _poison(block: nn.Module) -> None:
    original = block.branch

    def poisoned(x: torch.Tensor) -> torch.Tensor:
        y = original(x)
        y.register_hook(lambda g: g * float("inf"))  # the gradient entering this branch overflows
        return y

    block.branch = poisoned


def test_an_inf_in_one_block_drops_only_its_scale_skips_the_update_and_spares_the_optimizer() -> None:
    torch.manual_seed(0)
    model = DallePrior(A)
    scaler = apply_grad_scaler(model)
    blocks, others = resblocks(model), outside_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step(seed: int) -> bool:
        scaler.scale_loss(model(*_batch(seed)).loss).backward()
        skip = scaler.step(blocks, others)
        if not skip:
            opt.step()
        opt.zero_grad()
        return skip

    assert not train_step(0)  # a clean update: Adam has moments now
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)} for k, v in opt.state.items()}
    scales = scaler.log2_scales.clone()
    bad = 2  # the second layer's attention block
    original = blocks[bad].branch
    _poison(blocks[bad])
    scaler.scale_loss(model(*_batch(1)).loss).backward()
    assert bool(scaler.flags[bad]) and int(scaler.flags.sum()) == 1  # recorded where it happened, only there
    for i, block in enumerate(blocks[:bad]):  # the filter kept the Inf from the blocks before it
        assert all(torch.isfinite(p.grad).all() for p in block.parameters()), i
    assert scaler.step(blocks, others)
    opt.zero_grad()
    assert scaler.skips.tolist() == [int(i == bad) for i in range(len(blocks) + 1)]
    assert torch.equal(scaler.log2_scales != scales, torch.arange(len(blocks) + 1) == bad)
    assert float(scaler.log2_scales[bad]) == pytest.approx(float(scales[bad]) - 0.5)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    for k, v in opt.state.items():
        for n, t in moments[k].items():
            assert torch.equal(v[n], t) and torch.isfinite(v[n]).all(), n
    assert not scaler.flags.any()  # cleared for the next backward
    blocks[bad].branch = original
    assert not train_step(2)  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_flags_accumulate_over_micro_batches_until_the_update() -> None:
    torch.manual_seed(0)
    model = DallePrior(A)
    scaler = apply_grad_scaler(model)
    blocks = resblocks(model)
    original = blocks[1].branch
    _poison(blocks[1])
    model(*_batch(0)).loss.backward()  # micro-batch 1 overflows in block 1
    blocks[1].branch = original
    model(*_batch(1)).loss.backward()  # micro-batch 2 is clean
    assert bool(scaler.flags[1])
    assert scaler.step(blocks, outside_parameters(model)) and not scaler.flags.any()


def test_applying_twice_is_refused() -> None:
    model = DallePrior(A)
    apply_grad_scaler(model)
    with pytest.raises(ValueError, match="twice"):
        apply_grad_scaler(model)
    assert all(b.residual is not plain_residual for b in resblocks(model))


class _Half(nn.Module):
    """A resblock x + gain * W x with W in fp16; joined to the identity path by `residual`."""

    def __init__(self, d: int, gain: float, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
        self.lin.half()
        self.gain = gain
        self.residual = plain_residual

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.half()) * self.gain  # fp16 out: plain_residual's add promotes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.branch)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.block(x)
        return x


def _largest_finite(run: Callable[[float], list[torch.Tensor]], log2_range: range) -> int:
    """The largest log2 scale in `log2_range` (descending) whose backward stays finite."""
    for k in log2_range:
        if all(torch.isfinite(g).all() for g in run(float(2.0**k))):
            return k
    raise AssertionError("no finite scale")


def test_per_block_scales_keep_late_block_gradients_that_one_global_scale_flushes_to_zero() -> None:
    """Each block is set to the largest scale its own gradients allow (the fixed point App. D's rules move
    towards; the rules themselves are tested above). fp16 gradients are counted as stored, before unscaling."""
    gains = [64.0, 1.0, 1e-8, 1e-10]
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    top = 1e-3  # d loss / d out

    def global_run(scale: float) -> list[torch.Tensor]:
        model = _Stack(gains)
        (model(x) * (top * scale)).sum().backward()
        return [b.lin.weight.grad for b in resblocks(model)]

    k = _largest_finite(global_run, range(24, -1, -1))  # one scale: limited by the early block's gradients
    zeros_global = [int((g == 0).sum()) for g in global_run(float(2.0**k))]

    model = _Stack(gains)
    scaler = apply_grad_scaler(model)
    for i in range(len(gains)):

        def block_run(scale: float, i: int = i) -> list[torch.Tensor]:
            scaler.log2_scales[i] = math.log2(scale)
            for p in model.parameters():
                p.grad = None
            scaler.scale_loss((model(x) * top).sum()).backward()
            scaler.flags_on(x.device).zero_()
            return [model.layers[i].block.lin.weight.grad]

        scaler.log2_scales[i] = _largest_finite(block_run, range(24, -1, -1))
    for p in model.parameters():
        p.grad = None
    scaler.scale_loss((model(x) * top).sum()).backward()
    zeros_block = [int((b.lin.weight.grad == 0).sum()) for b in resblocks(model)]
    overflow, outside = scaler.unscale_and_check(resblocks(model), [], unscale=False)
    assert not overflow.any() and not outside
    assert zeros_global[-1] > 128 and zeros_global[0] == 0, zeros_global  # the late block's gradient flushed
    assert zeros_block == [0] * len(gains), zeros_block
    assert scaler.log2_scales[len(gains) - 1] > k + 8  # the late block runs at a far larger scale than the global one


def test_deepspeed_skip_on_a_nonfinite_clipping_norm_divides_the_outside_scale() -> None:
    """Inside ZeRO-3 (engine/ds_grad_scaler.py) the scales are updated after DeepSpeed's own last check: a clipping
    norm that is not finite although every partition was (a sum of squares that overflowed) skips the update and
    is charged to S, which every partition carries by then; a clean update grows every scale. DeepSpeed's loss
    scale is S times the accumulation count (3 here), which DeepSpeed's engine divides each micro-batch's loss by."""
    from megadalle.engine.ds_grad_scaler import _update_scales

    s = PerBlockScaler(2)
    flags = (torch.zeros(2, dtype=torch.bool), False)
    opt = SimpleNamespace(megadalle_scaler=s, megadalle_flags=flags, overflow=True, gradient_accumulation_steps=3)
    _update_scales(opt)
    assert s.log2_scales.tolist() == [13.0, 13.0, 12.5] and opt.external_loss_scale == 3 * 2.0**12.5
    assert s.skipped_updates == 1
    opt.overflow = False
    _update_scales(opt)
    assert s.log2_scales.tolist() == pytest.approx([13 + G, 13 + G, 12.5 + G])


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("MEGADALLE_REQUIRE_GPU") != "1", reason="needs a CUDA device"
)
def test_gpu_fp16_blocks_scale_and_unscale_on_the_device() -> None:
    """On CUDA (fp16 tensor-core matmuls, `auto` attention: the Triton kernels): the prior's fp16 blocks with
    distinct per-block scales, activation checkpointing on, give gradients that divide back to the fp32 model's.
    The overflow flags are set on the device during backward (no host sync); `unscale_and_check` returns them
    on the host, after its one transfer."""
    text, image, ref, model = _reference_and_twin()
    text, image, model = text.cuda(), image.cuda(), model.cuda()
    for block in resblocks(model):
        block.half()
    apply_activation_checkpointing(model)
    scaler = apply_grad_scaler(model)
    scaler.log2_scales += torch.arange(scaler.n_blocks + 1, dtype=torch.float64) * 0.37
    scaler.scale_loss(model(text, image).loss).backward()
    overflow, outside = scaler.unscale_and_check(resblocks(model), outside_parameters(model), unscale=False)
    assert scaler.flags.device.type == "cuda"  # written in backward, on the device
    assert overflow.device.type == "cpu" and not overflow.any() and not outside  # returned after one host transfer
    refs = dict(ref.named_parameters())
    for i, block in enumerate(resblocks(model)):
        for p in block.parameters():
            want, got = refs[_name(model, p)].grad, p.grad.float().cpu() / scaler.scale(i)
            assert (got - want).norm() <= 0.02 * want.norm(), _name(model, p)
