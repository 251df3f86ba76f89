"""The per-resblock gradient scaler (engine/grad_scaler.py) inside DeepSpeed's ZeRO-3 optimizer, under fp16.

fp16 runs through DeepSpeed's `torch_autocast` (engine/ds_config.py writes the tables): every parameter
partition is fp32, so gains, biases, embeddings and unembeddings are stored, gathered, reduced and updated in
fp32 (App. D.2); the matmul weights (`megadalle.models.layers.Linear`) are gathered and their gradients
reduce-scattered in fp16, and autocast runs the matmuls in fp16. The Linear biases, which DeepSpeed would
gather in fp16 with their weights, are taken back to fp32 here. DeepSpeed's own fp16 scaler (a
`torch.amp.GradScaler`) is removed; the loss is multiplied by the scaler's S, its scale for the parameters
outside the resblocks (DeepSpeed's `custom_loss_scaler`, times the accumulation count that DeepSpeed divides the
loss by), DeepSpeed divides every gradient by that, and the
gradient partitions accumulate in fp32 (`data_types.grad_accum_dtype`). At each update, before DeepSpeed
computes the gradient norm (for clipping) and steps, `_overflow_check_and_loss_scale_update` is replaced by
one that

1. attributes non-finite gradient partitions (one fused max-abs norm over all of them) to their resblock (or
   to the parameters outside the resblocks), ORs in the activation-gradient flags recorded in backward, and
   all-reduces the flags (MAX over the data-parallel group: every rank takes the same skip decision and the
   same scale updates);
2. if nothing overflowed, divides each resblock parameter's fp32 gradient partition by s_i / S, in place (one
   fused multiply), so that every partition carries S, which DeepSpeed divides out for the norm, the clipping
   and the Adam step;
3. once DeepSpeed has also checked the clipping norm (`_loss_scale_update_and_overflow_cleanup`), applies App.
   D's update rules (`PerBlockScaler.update`) and hands DeepSpeed the new S for the next update.

DeepSpeed 0.19.8 internals used (stage3.py): `fp16_groups`, `__param_id_to_grad_partition` (per-parameter views
of the flat gradient partition buffer), `dp_process_group`, `ipg_buckets`, `torch_autocast_gradscaler`,
`custom_loss_scaler` / `external_loss_scale`, `_loss_scale_update_and_overflow_cleanup`. Optimizer offload is
refused (its gradients are copied elsewhere before this point).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megadalle.engine.grad_scaler import PerBlockScaler, resblocks


def _overflow_check_and_scale_update(self: Any, update_scale: bool = True) -> bool:
    scaler: PerBlockScaler = self.megadalle_scaler
    block_of: dict[int, int] = self.megadalle_block_of
    self.overflow = False
    parts = self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition  # fetched fresh: rebuilt on reloads
    device = self.grad_partitions_flat_buffer.device
    flags = torch.zeros(scaler.n_blocks + 1, dtype=torch.uint8, device=device)  # blocks..., outside
    if scaler.flags is not None:
        flags[:-1] |= scaler.flags.to(device, torch.uint8)
    # this rank's gradient partitions and the slot each belongs to (the last: outside the resblocks)
    grads, slots = [], []
    for p in chain(*self.fp16_groups):
        g = parts.get(p.ds_id)
        if g is not None and g.numel():
            grads.append(g)
            slots.append(block_of.get(p.ds_id, scaler.n_blocks))
    if grads:  # the max-abs norm is inf or nan exactly when a partition is non-finite (and cannot overflow)
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))
        flags.scatter_reduce_(0, torch.tensor(slots, device=device), bad.to(torch.uint8), reduce="amax")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.dp_process_group)
    flags = flags.cpu().bool()
    blocks, outside = flags[:-1], bool(flags[-1])
    skip = bool(blocks.any()) or outside
    if not skip:  # fp32 partitions, so no flush: block gradients divided by s_i / S (S is left for DeepSpeed)
        in_blocks = [i for i, b in enumerate(slots) if b < scaler.n_blocks]
        factors = [scaler.loss_scale / scaler.scale(slots[i]) for i in in_blocks]
        torch._foreach_mul_([grads[i] for i in in_blocks], factors)
    self.megadalle_flags = (blocks, outside)  # the scales are updated once DeepSpeed has decided (below)
    self.overflow = skip
    if not update_scale:
        return self.overflow
    return self._loss_scale_update_and_overflow_cleanup()


def _update_scales(self: Any) -> None:
    """After DeepSpeed's last check (a non-finite clipping norm from finite partitions also skips the update: a
    sum of squares that overflowed, charged to S, which every partition carries by then): App. D's rules."""
    scaler: PerBlockScaler = self.megadalle_scaler
    blocks, outside = self.megadalle_flags
    outside = outside or (self.overflow and not bool(blocks.any()))
    scaler.update(blocks, outside)
    if self.overflow:  # nothing is unscaled this update: the next backward can take the new S now (else after the step)
        _set_loss_scale(self, scaler.loss_scale)


def _set_loss_scale(optimizer: Any, value: float) -> None:
    """DeepSpeed multiplies the loss by `value` times the accumulation count and divides the gradients by that
    (`override_loss_scale` without its log line at every change). DeepSpeed's engine divides each micro-batch's
    loss by the accumulation count before it reaches the optimizer: the count here puts it back, so that each
    micro-batch's backward carries `value` times its own mean loss (train_update), at any accumulation count and
    world size: the per-resblock scales are App. D's for one micro-batch (engine/grad_scaler.py)."""
    optimizer.custom_loss_scaler = True
    optimizer.external_loss_scale = value * optimizer.gradient_accumulation_steps


def install(optimizer: Any, model: nn.Module, scaler: PerBlockScaler) -> None:
    """Make DeepSpeed's ZeRO-3 optimizer `optimizer` apply `scaler` (the model's resblocks must already join
    through it: `apply_grad_scaler`). Swaps the instance's class for a subclass overriding three methods."""
    from deepspeed.runtime.torch_autocast import get_autocast_dtype, is_autocast_initialized
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        raise ValueError(f"per-resblock gradient scaling runs in ZeRO-3's optimizer, got {type(optimizer).__name__}"
                         " (set zero_optimization.stage = 3)")  # fmt: skip
    if not (is_autocast_initialized() and get_autocast_dtype() == torch.float16) or optimizer.dtype != torch.float32:
        raise ValueError("per-resblock gradient scaling runs fp16 through DeepSpeed's torch_autocast with fp32 "
                         f"parameters (engine/ds_config.py writes it); parameters are {optimizer.dtype}")  # fmt: skip
    if getattr(optimizer, "offload_optimizer", False):
        raise ValueError("per-resblock gradient scaling does not support optimizer offload (gradients are copied to "
                         "fp32 before the scales could be divided out)")  # fmt: skip
    if optimizer.grad_partitions_flat_buffer.dtype != torch.float32:
        raise ValueError(f"per-resblock gradient scaling needs fp32 gradient partitions (data_types.grad_accum_dtype"
                         f" = fp32), got {optimizer.grad_partitions_flat_buffer.dtype}")  # fmt: skip
    block_of = {p.ds_id: i for i, block in enumerate(resblocks(model)) for p in block.parameters()}
    if len(block_of) == 0:
        raise ValueError("no resblock parameters found")
    for p in model.parameters():  # App. D.2: biases in fp32, gathered and reduced in fp32 too
        if hasattr(p, "comm_dtype") and len(p.ds_shape) == 1:
            del p.comm_dtype
    if torch.float32 not in optimizer.ipg_buckets:  # made at init for the fp32 parameters (the norms' gains)
        raise ValueError("ZeRO-3 has no fp32 gradient bucket: the model has no parameters outside fp16 matmuls")
    optimizer.torch_autocast_gradscaler = None  # DeepSpeed's dynamic fp16 scaler: replaced by ours
    optimizer.megadalle_scaler, optimizer.megadalle_block_of = scaler, block_of
    cls = type(optimizer)

    def _post_step(self: Any, timer_names: Any) -> None:
        cls._post_step(self, timer_names)
        _set_loss_scale(self, self.megadalle_scaler.loss_scale)  # after DeepSpeed divided this update's S out

    def _loss_scale_update_and_overflow_cleanup(self: Any) -> bool:
        _update_scales(self)
        return cls._loss_scale_update_and_overflow_cleanup(self)

    methods = {
        "_overflow_check_and_loss_scale_update": _overflow_check_and_scale_update,
        "_loss_scale_update_and_overflow_cleanup": _loss_scale_update_and_overflow_cleanup,
        "_post_step": _post_step,
    }
    optimizer.__class__ = type(f"PerResblockScaled{cls.__name__}", (cls,), methods)
    sync(optimizer)


def sync(optimizer: Any) -> None:
    """Hand DeepSpeed the scaler's S as its loss scale: at install, and after a checkpoint is loaded (which
    restores the loss scaler DeepSpeed saved, maybe a `global` run's dynamic one: it would be updated, unused, on
    every skip until it raised at its minimum; DeepSpeed's own is a static 1 here)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    optimizer.loss_scaler, optimizer.dynamic_loss_scale = LossScaler(1.0), False
    _set_loss_scale(optimizer, optimizer.megadalle_scaler.loss_scale)
