"""Per-resblock gradient scaling for fp16 (Ramesh et al. 2021, Sec. 2.4, Fig. 4, App. D).

One scale per resblock (attention and MLP each). Around each resblock x + f(x), applied from outside the model
through the `run_block` seam (engine/wrap.py):

    out = x + ScaleGrad(f(UnscaleFilter(x)))

Backward: the gradient entering the branch f is multiplied by the block's scale (ScaleGrad); the gradient
leaving it towards x is divided by the scale and its Inf/NaN entries set to 0 (UnscaleFilter), recording that
this block overflowed, so that one block's overflow neither reaches the blocks before it nor shrinks their
scales; then it joins the identity path, which never sees a scale. The parameters of f hold gradients scaled by
the block's scale: `PerBlockScaler.unscale_and_check` divides them before the optimizer and finds the blocks
whose gradients are not finite.

Update rules (App. D): scale_0 = M * 2^13 (M data-parallel replicas); after an applied update, each block
whose gradients were finite grows by 2^(1/1000); a block with non-finite gradients is divided by sqrt(2) and the
whole update is skipped, but a scale is not divided again within 125 updates of its last division; scales stay
in [M * 2^7, M * 2^24]. We read "after an update" literally: when the update is skipped (some block
overflowed), no scale grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megadalle.models.transformer import BlockRunner


@dataclass(frozen=True)
class ScalerRules:
    """App. D's constants, in log2 units of the scale (M's factor added by the scaler)."""

    init_log2: float = 13.0
    growth_log2: float = 1 / 1000
    backoff_log2: float = 0.5
    """Divide by sqrt(2) = 2^0.5 on overflow."""
    backoff_window: int = 125
    """No second division of the same scale within this many updates."""
    min_log2: float = 7.0
    max_log2: float = 24.0


class PerBlockScaler:
    """The scales of `n_blocks` resblocks and their bookkeeping, on the host (float64: 2^(1/1000) steps are exact
    enough over millions of updates). `flags` (n_blocks,) bool on the model's device collects, during backward,
    which blocks' outgoing activation gradients were not finite."""

    def __init__(self, n_blocks: int, replicas: int = 1, rules: ScalerRules = ScalerRules()) -> None:
        if n_blocks < 1 or replicas < 1:
            raise ValueError(f"need n_blocks >= 1 and replicas >= 1, got {n_blocks}, {replicas}")
        self.rules, self.replicas = rules, replicas
        self.log2_m = math.log2(replicas)
        self.log2_scales = torch.full((n_blocks,), self.log2_m + rules.init_log2, dtype=torch.float64)
        self.last_division = torch.full((n_blocks,), -(10**9), dtype=torch.int64)
        self.skips = torch.zeros(n_blocks, dtype=torch.int64)
        """Per block: updates skipped because this block's gradients were not finite."""
        self.updates = 0
        """Update attempts so far (applied or skipped)."""
        self.skipped_updates = 0
        self.flags: torch.Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return int(self.log2_scales.numel())

    def scale(self, i: int) -> float:
        return float(2.0 ** self.log2_scales[i])

    def reset_flags(self, device: torch.device) -> torch.Tensor:
        """Fresh overflow flags for the next backward (called before each forward by `scaled`)."""
        if self.flags is None or self.flags.device != device:
            self.flags = torch.zeros(self.n_blocks, dtype=torch.bool, device=device)
        else:
            self.flags.zero_()
        return self.flags

    def update(self, overflow: torch.Tensor) -> bool:
        """Apply App. D's rules for one update attempt, given which blocks overflowed (n_blocks,) bool.
        Returns True when the update must be skipped."""
        overflow = overflow.detach().to("cpu", torch.bool)
        r, step = self.rules, self.updates
        skip = bool(overflow.any())
        if skip:
            may_divide = overflow & (step - self.last_division >= r.backoff_window)
            self.log2_scales[may_divide] -= r.backoff_log2
            self.last_division[may_divide] = step
            self.skips[overflow] += 1
            self.skipped_updates += 1
        else:
            self.log2_scales += r.growth_log2
        self.log2_scales.clamp_(self.log2_m + r.min_log2, self.log2_m + r.max_log2)
        self.updates += 1
        return skip

    def unscale_and_check(
        self, blocks: list[nn.Module], others: list[nn.Parameter], unscale: bool = True
    ) -> torch.Tensor:
        """Divide each block's parameter gradients by its scale (`unscale`); return (n_blocks,) bool: the block
        overflowed (its outgoing activation gradient, recorded in backward, or one of its parameter gradients is
        not finite). A non-finite gradient of a parameter outside the resblocks (embeddings, heads, final norm)
        marks every block. One host transfer at the end (the skip decision needs it anyway).
        fp16 gradients are not divided in place: dividing in fp16 would flush the small values the scale exists
        to keep. Unscale them into fp32 master gradients instead (`unscale=False` here; the fp16 engine divides
        its fp32 copy by `scale(i)`)."""
        if len(blocks) != self.n_blocks:
            raise ValueError(f"the scaler has {self.n_blocks} scales but got {len(blocks)} resblocks")
        device = self.flags.device if self.flags is not None else torch.device("cpu")
        bad = self.flags.clone() if self.flags is not None else torch.zeros(self.n_blocks, dtype=torch.bool)
        for i, block in enumerate(blocks):
            inv = 1.0 / self.scale(i)
            for name, p in block.named_parameters():
                if p.grad is None:
                    continue
                if unscale:
                    if p.grad.dtype == torch.float16:
                        raise ValueError(f"resblock {i} parameter {name} has an fp16 gradient: unscale it into an "
                                         "fp32 master gradient (unscale=False here)")  # fmt: skip
                    p.grad.mul_(inv)
                bad[i] |= ~torch.isfinite(p.grad).all()
        outside = torch.zeros((), dtype=torch.bool, device=device)
        for p in others:
            if p.grad is not None:
                outside |= ~torch.isfinite(p.grad).all().to(device)
        return (bad | outside).cpu()

    def step(self, blocks: list[nn.Module], others: list[nn.Parameter]) -> bool:
        """After backward, before the optimizer: unscale the blocks' gradients, apply the update rules, clear the
        overflow flags for the next backward. True: skip this update (zero the gradients, do not step)."""
        skip = self.update(self.unscale_and_check(blocks, others))
        if self.flags is not None:
            self.flags.zero_()
        return skip

    def state_dict(self) -> dict[str, Any]:
        return {"log2_scales": self.log2_scales.clone(), "last_division": self.last_division.clone(),
                "skips": self.skips.clone(), "updates": self.updates, "skipped_updates": self.skipped_updates,
                "replicas": self.replicas}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["log2_scales"].numel() != self.n_blocks:
            raise ValueError(f"scaler state has {state['log2_scales'].numel()} scales, this model {self.n_blocks}")
        self.log2_scales = state["log2_scales"].clone().double()
        self.last_division = state["last_division"].clone()
        self.skips = state["skips"].clone()
        self.updates, self.skipped_updates = int(state["updates"]), int(state["skipped_updates"])

    def metrics(self) -> dict[str, float]:
        """For the JSON step line: min / max log2 scale, skipped updates so far."""
        return {"grad_scale_log2_min": float(self.log2_scales.min()), "grad_scale_log2_max":
                float(self.log2_scales.max()), "skipped_updates": float(self.skipped_updates)}  # fmt: skip


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient entering the branch by the block's scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.scale, None


class _UnscaleFilterGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient leaving the branch by the scale, zeroes its Inf/NaN
    entries and sets flags[index] when there were any (in place on the device: no host sync)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, flags: torch.Tensor, index: int) -> torch.Tensor:
        ctx.scale, ctx.flags, ctx.index = scale, flags, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        g = g / ctx.scale
        finite = torch.isfinite(g)
        ctx.flags[ctx.index] |= ~finite.all()
        return torch.where(finite, g, torch.zeros_like(g)), None, None, None


class _Branch:
    """The branch f of a resblock x + f(x), callable like a block (and with its `training`), so that inner
    wrappers (activation checkpointing) run f alone."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    @property
    def training(self) -> bool:
        return self.block.training

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.branch(x)


def scaled(inner: BlockRunner, scaler: PerBlockScaler) -> BlockRunner:
    """A block runner applying the per-resblock gradient scale around each resblock's branch. Each resblock
    carries its index as `block.grad_scale_index` (set by `apply_grad_scaler`)."""

    def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (block.training and torch.is_grad_enabled()):
            return inner(block, x)
        i = block.grad_scale_index
        if scaler.flags is None or scaler.flags.device != x.device:
            scaler.reset_flags(x.device)
        s = scaler.scale(i)
        h = _UnscaleFilterGrad.apply(x, s, scaler.flags, i)
        return x + _ScaleGrad.apply(inner(_Branch(block), h), s)

    return run


def resblocks(model: nn.Module) -> list[nn.Module]:
    """The model's resblocks in forward order (attention, MLP, attention, ...): the scaler's block order."""
    return [block for layer in model.layers for block in layer.resblocks()]


def apply_grad_scaler(model: nn.Module, replicas: int = 1, rules: ScalerRules = ScalerRules()) -> PerBlockScaler:
    """Wrap every resblock of `model` (a model with the `run_block` seam and `layers`) in its gradient scale;
    returns the scaler the training loop steps (`unscale_and_check`, `update`)."""
    blocks = resblocks(model)
    for i, block in enumerate(blocks):
        block.grad_scale_index = i
    scaler = PerBlockScaler(len(blocks), replicas, rules)
    model.run_block = scaled(model.run_block, scaler)
    return scaler
