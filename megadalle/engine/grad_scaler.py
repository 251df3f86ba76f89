"""Per-resblock gradient scaling for fp16 (Ramesh et al. 2021, Sec. 2.4, Fig. 4, App. D).

One scale per resblock (attention and MLP each). Each resblock x + f(x) joins its branch f to the identity path
through its `residual` attribute (models/transformer.py); `apply_grad_scaler` replaces it, from outside the
model, with

    out = x + ScaleGrad(f(UnscaleFilter(x).to(branch dtype)).float())

so the block is still called through its `__call__` (ZeRO-3's hooks, activation checkpointing).

The parameters outside the resblocks (embeddings, final norm, unembeddings) have a scale of their own, the last
slot, S: the loss is multiplied by S (`scale_loss`; DeepSpeed's loss scale under ZeRO-3), which keeps their
gradients from flushing where they are fp16 (a model stored in fp16; under ZeRO-3's autocast route they are
fp32, App. D.2), and the identity path carries gradients times S, in fp32 (an fp16 stream from the embeddings
is upcast at the first block). Backward through block i: the gradient entering the
branch is multiplied by s_i / S in fp32 *before* it is cast to the branch's dtype (it then carries s_i: small
values survive the cast to fp16); the gradient leaving the branch is cast to fp32, divided by s_i / S and its
Inf/NaN entries set to 0 (UnscaleFilter), recording that this block overflowed, so that one block's overflow
neither reaches the blocks before it nor shrinks their scales. So block i's parameter gradients carry s_i and
the outside ones S: each is divided by its own before the optimizer, in fp32 (`unscale_and_check` for fp32/bf16
parameters; under ZeRO-3 in fp16, engine/ds_grad_scaler.py divides its fp32 partitions by s_i / S and
DeepSpeed divides everything by its loss scale S).

Update rules (App. D): each scale starts at 2^13; after an applied update, each block whose gradients were
finite grows by 2^(1/1000); a block with non-finite gradients is divided by sqrt(2) and the whole update is
skipped, but a scale is not divided again within 125 update attempts (skipped ones count: a window of applied
updates could never end under persistent overflow) of its last division; scales stay in [2^7, 2^24]. We read
"after an update" literally: when the update is skipped, no scale grows. The outside scale S follows the same
rules, driven by the outside parameters' gradients.

App. D's M * 2^13 (M data-parallel replicas) is paired with a loss divided by the global batch, M included, so a
rank's backward carries 2^13 times the gradient of its own mean loss. Here the loss a micro-batch's backward
carries is its own mean (train.py's `train_update`, and DeepSpeed's loss scale S times the accumulation count,
engine/ds_grad_scaler.py): the scales are App. D's without the factor M, and every fp16 activation gradient is
the same at 1 rank or 1,024 for the same micro-batch (tests/engine/test_world_size_invariance.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megadalle.models.transformer import Residual, plain_residual


@dataclass(frozen=True)
class ScalerRules:
    """App. D's constants, in log2 units of the scale, per micro-batch mean loss (App. D's M factor is the loss
    normalisation's: see the module docstring)."""

    init_log2: float = 13.0
    growth_log2: float = 1 / 1000
    backoff_log2: float = 0.5
    """Divide by sqrt(2) = 2^0.5 on overflow."""
    backoff_window: int = 125
    """No second division of the same scale within this many updates."""
    min_log2: float = 7.0
    max_log2: float = 24.0


class PerBlockScaler:
    """The scales of `n_blocks` resblocks and of the parameters outside them (slot n_blocks, the loss scale S),
    and their bookkeeping, on the host (float64: 2^(1/1000) steps are exact enough over millions of updates).
    `flags` (n_blocks,) bool on the model's device collects, during backward, which blocks' outgoing activation
    gradients were not finite."""

    scope = "global"  # checkpointed once, in extra.pt (engine/train_state.py)

    def __init__(self, n_blocks: int, rules: ScalerRules = ScalerRules()) -> None:
        if n_blocks < 1:
            raise ValueError(f"need n_blocks >= 1, got {n_blocks}")
        self.rules = rules
        self.log2_scales = torch.full((n_blocks + 1,), rules.init_log2, dtype=torch.float64)
        self.last_division = torch.full((n_blocks + 1,), -(10**9), dtype=torch.int64)
        self.skips = torch.zeros(n_blocks + 1, dtype=torch.int64)
        """Per slot (blocks, then outside): updates skipped because its gradients were not finite."""
        self.updates = 0
        """Update attempts so far (applied or skipped)."""
        self.skipped_updates = 0
        self.flags: torch.Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return int(self.log2_scales.numel()) - 1

    def scale(self, i: int) -> float:
        """Slot i's scale: resblock i, or (i = n_blocks) the parameters outside the resblocks."""
        return float(2.0 ** self.log2_scales[i])

    @property
    def loss_scale(self) -> float:
        """S, the outside parameters' scale, by which the loss is multiplied."""
        return self.scale(self.n_blocks)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale

    def flags_on(self, device: torch.device) -> torch.Tensor:
        """The overflow flags on `device`, created there on first use. They accumulate over the micro-batches of
        one update (gradient accumulation) and are cleared by `update`."""
        if self.flags is None or self.flags.device != device:
            self.flags = torch.zeros(self.n_blocks, dtype=torch.bool, device=device)
        return self.flags

    def update(self, overflow: torch.Tensor, outside: bool = False) -> bool:
        """Apply App. D's rules for one update attempt, given which blocks overflowed (n_blocks,) bool and whether
        a gradient outside the resblocks did; clear the overflow flags. Returns True when the update must be
        skipped."""
        overflow = torch.cat([overflow.detach().to("cpu", torch.bool), torch.tensor([bool(outside)])])
        r, step = self.rules, self.updates
        if self.flags is not None:
            self.flags.zero_()
        skip = bool(overflow.any())
        if skip:
            may_divide = overflow & (step - self.last_division >= r.backoff_window)
            self.log2_scales[may_divide] -= r.backoff_log2
            self.last_division[may_divide] = step
            self.skips[overflow] += 1
            self.skipped_updates += 1
        else:
            self.log2_scales += r.growth_log2
        self.log2_scales.clamp_(r.min_log2, r.max_log2)
        self.updates += 1
        return skip

    def unscale_and_check(
        self, blocks: list[nn.Module], others: list[nn.Parameter], unscale: bool = True
    ) -> tuple[torch.Tensor, bool]:
        """Divide each block's parameter gradients by its scale and the others' by the loss scale (`unscale`);
        return (n_blocks,) bool, the block overflowed (its outgoing activation gradient, recorded in backward, or
        one of its parameter gradients is not finite), and whether a gradient outside the resblocks is not
        finite. One host transfer.
        fp16 gradients are not divided in place: dividing in fp16 would flush the small values the scale exists
        to keep. Unscale them into fp32 master gradients instead (`unscale=False` here)."""
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
        inv = 1.0 / self.loss_scale
        for p in others:
            if p.grad is None:
                continue
            if unscale:
                if p.grad.dtype == torch.float16:
                    raise ValueError("a parameter outside the resblocks has an fp16 gradient: unscale it into an fp32 "
                                     "master gradient (unscale=False here)")  # fmt: skip
                p.grad.mul_(inv)
            outside |= ~torch.isfinite(p.grad).all().to(device)
        flags = torch.cat([bad, outside.view(1)]).cpu()
        return flags[:-1], bool(flags[-1])

    def step(self, blocks: list[nn.Module], others: list[nn.Parameter]) -> bool:
        """After `scale_loss(loss).backward()`, before the optimizer (fp32/bf16 parameters): unscale every gradient
        and apply the update rules. True: skip this update (zero the gradients, do not step the optimizer)."""
        overflow, outside = self.unscale_and_check(blocks, others)
        return self.update(overflow, outside)

    def state_dict(self) -> dict[str, Any]:
        return {"log2_scales": self.log2_scales.clone(), "last_division": self.last_division.clone(),
                "skips": self.skips.clone(), "updates": self.updates, "skipped_updates": self.skipped_updates,
                "per_micro_batch_mean": True}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Returns False when `state` was saved when the scales carried App. D's M on a backward divided by the
        accumulation count (megadalle before issue 26): its scales do not map to these without the run's
        accumulation count, so they restart at 2^13 (the counters are kept)."""
        if state["log2_scales"].numel() != self.n_blocks + 1:
            raise ValueError(f"scaler state has {state['log2_scales'].numel() - 1} resblock scales, this model "
                             f"{self.n_blocks}")  # fmt: skip
        self.skips = state["skips"].detach().to("cpu", torch.int64).clone()
        self.updates, self.skipped_updates = int(state["updates"]), int(state["skipped_updates"])
        if not state.get("per_micro_batch_mean"):
            self.log2_scales.fill_(self.rules.init_log2)
            self.last_division.fill_(-(10**9))
            return False
        self.log2_scales = state["log2_scales"].detach().to("cpu", torch.float64).clone()
        self.last_division = state["last_division"].detach().to("cpu", torch.int64).clone()
        return True

    def metrics(self, per_block: bool = False) -> dict[str, Any]:
        """For the JSON step line: the blocks' min / max log2 scale, the outside (loss) scale's, skipped updates;
        `per_block` adds every block's log2 scale and skip count (lists in resblock order: attention, MLP, ...)
        and the outside scale's skips."""
        blocks = self.log2_scales[:-1]
        out: dict[str, Any] = {"grad_scale_log2_min": round(float(blocks.min()), 4),
                               "grad_scale_log2_max": round(float(blocks.max()), 4),
                               "grad_scale_log2_outside": round(float(self.log2_scales[-1]), 4),
                               "grad_scale_skipped_updates": self.skipped_updates}  # fmt: skip
        if per_block:
            out["grad_scale_log2"] = [round(v, 4) for v in blocks.tolist()]
            out["grad_scale_skips"] = self.skips[:-1].tolist()
            out["grad_scale_outside_skips"] = int(self.skips[-1])
        return out


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the (fp32) gradient entering the branch by the block's scale."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.scale, None


class _UnscaleFilterGrad(torch.autograd.Function):
    """Identity forward; backward divides the (fp32) gradient leaving the branch by the scale, zeroes its Inf/NaN
    entries and sets flags[index] when there were any (in place on the device: no host sync)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, flags: torch.Tensor, index: int) -> torch.Tensor:
        ctx.scale, ctx.flags, ctx.index = scale, flags, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        g = g / ctx.scale
        ctx.flags[ctx.index] |= ~torch.isfinite(g).all()
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), None, None, None


def scaled_residual(block: nn.Module, scaler: PerBlockScaler, index: int) -> Residual:
    """The residual join of `block` with its gradient scale `index` (see the module docstring). Without autograd
    (evaluation, sampling) it is the plain x + f(x)."""

    def residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return x + branch(x)
        x = x.float()  # the identity path is fp32 (App. D): an fp16 stream (embeddings) is upcast at its first block
        s = scaler.scale(index) / scaler.loss_scale  # the identity path's gradient already carries the loss scale
        h = _UnscaleFilterGrad.apply(x, s, scaler.flags_on(x.device), index)
        dtype = next(block.parameters()).dtype  # fp16 for fp16-stored blocks; fp32 under autocast, which casts inside
        return x + _ScaleGrad.apply(branch(h.to(dtype)).float(), s)

    return residual


def resblocks(model: nn.Module) -> list[nn.Module]:
    """The model's resblocks in forward order (attention, MLP, attention, ...): the scaler's block order."""
    return [block for layer in model.layers for block in layer.resblocks()]


def outside_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that belong to no resblock (embeddings, heads, final norm), in model order."""
    inside = {p for block in resblocks(model) for p in block.parameters()}  # membership by identity, not a cache
    return [p for p in model.parameters() if p not in inside]


def apply_grad_scaler(model: nn.Module, rules: ScalerRules = ScalerRules()) -> PerBlockScaler:
    """Give every resblock of `model` (a model with `layers` of resblocks that join through `residual`) its
    gradient scale; returns the scaler the training loop steps (`step`, or `unscale_and_check` + `update`)."""
    blocks = resblocks(model)
    if any(block.residual is not plain_residual for block in blocks):
        raise ValueError("the resblocks' residual joins are already replaced (apply_grad_scaler twice?)")
    scaler = PerBlockScaler(len(blocks), rules)
    for i, block in enumerate(blocks):
        block.residual = scaled_residual(block, scaler, i)
    return scaler
