"""The per-resblock gradient scaler (engine/grad_scaler.py) inside DeepSpeed's ZeRO-3 fp16 optimizer.

DeepSpeed's loss scale is static and set by the scaler to S, its scale for the parameters outside the
resblocks (embeddings, final norm, heads), so DeepSpeed multiplies the loss by S and divides every gradient by
S; its gradient partitions accumulate in fp32 (`data_types.grad_accum_dtype`, set by engine/ds_config.py). At
each update, before DeepSpeed computes the gradient norm (for clipping) and steps,
`_overflow_check_and_loss_scale_update` is replaced by one that

1. runs DeepSpeed's own overflow check (all-reduced over the data-parallel group);
2. attributes non-finite gradient partitions to their resblock (or to the parameters outside the resblocks),
   ORs in the activation-gradient flags recorded in backward, and all-reduces the flags (MAX over the
   data-parallel group: every rank takes the same skip decision and the same scale updates);
3. if nothing overflowed, divides each resblock parameter's fp32 gradient partition by s_i / S, in place, so
   that every partition carries S, which DeepSpeed divides out for the norm, the clipping and the Adam step;
4. applies App. D's update rules (`PerBlockScaler.update`) and hands DeepSpeed the new S for the next update.

DeepSpeed 0.19.8 internals used (stage3.py): `fp16_groups`, `__param_id_to_grad_partition` (per-parameter views
of the flat gradient partition buffer), `check_overflow`, `dp_process_group`, `_loss_scale_update_and_overflow_
cleanup`. Optimizer offload is refused (its gradients are copied to fp32 before this point).
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
    if self.dtype == torch.float16:
        self.check_overflow()  # DeepSpeed's global check (already agreed across ranks)
    parts = self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition  # fetched fresh: rebuilt on reloads
    device = self.grad_partitions_flat_buffer.device
    flags = torch.zeros(scaler.n_blocks + 1, dtype=torch.uint8, device=device)  # blocks..., outside
    if scaler.flags is not None:
        flags[:-1] |= scaler.flags.to(device, torch.uint8)
    params = list(chain(*self.fp16_groups))
    for p in params:
        g = parts.get(p.ds_id)
        if g is None:
            continue
        bad = (~torch.isfinite(g).all()).to(torch.uint8)
        b = block_of.get(p.ds_id, scaler.n_blocks)  # the last flag: outside the resblocks
        flags[b] |= bad
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.dp_process_group)
    flags = flags.cpu().bool()
    blocks, outside = flags[:-1], bool(flags[-1]) or (self.overflow and not bool(flags[:-1].any()))
    skip = bool(blocks.any()) or outside or self.overflow
    if not skip:
        for p in params:
            b = block_of.get(p.ds_id)
            g = parts.get(p.ds_id)
            if b is not None and g is not None:
                g.mul_(scaler.loss_scale / scaler.scale(b))  # fp32 partitions: no flush; S is left for DeepSpeed
    scaler.update(blocks, outside)
    self.overflow = skip
    if skip:  # nothing is unscaled this update: the next backward can take the new S now (else after the step)
        self.loss_scale = scaler.loss_scale
    if not update_scale:
        return self.overflow
    return self._loss_scale_update_and_overflow_cleanup()


def install(optimizer: Any, model: nn.Module, scaler: PerBlockScaler) -> None:
    """Make DeepSpeed's ZeRO-3 optimizer `optimizer` apply `scaler` (the model's resblocks must already join
    through it: `apply_grad_scaler`). Swaps the instance's class for a subclass overriding one method."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        raise ValueError(f"per-resblock gradient scaling runs in ZeRO-3's optimizer, got {type(optimizer).__name__}"
                         " (set zero_optimization.stage = 3)")  # fmt: skip
    if getattr(optimizer, "offload_optimizer", False):
        raise ValueError("per-resblock gradient scaling does not support optimizer offload (gradients are copied to "
                         "fp32 before the scales could be divided out)")  # fmt: skip
    if optimizer.grad_partitions_flat_buffer.dtype != torch.float32:
        raise ValueError(f"per-resblock gradient scaling needs fp32 gradient partitions (data_types.grad_accum_dtype"
                         f" = fp32), got {optimizer.grad_partitions_flat_buffer.dtype}")  # fmt: skip
    if optimizer.dynamic_loss_scale:
        raise ValueError("DeepSpeed's loss scale must be static (engine/ds_config.py sets fp16.loss_scale): the "
                         "per-resblock scaler sets it")  # fmt: skip
    block_of = {p.ds_id: i for i, block in enumerate(resblocks(model)) for p in block.parameters()}
    if len(block_of) == 0:
        raise ValueError("no resblock parameters found")
    optimizer.megadalle_scaler, optimizer.megadalle_block_of = scaler, block_of
    cls = type(optimizer)

    def _post_step(self: Any, timer_names: Any) -> None:
        cls._post_step(self, timer_names)
        self.loss_scale = self.megadalle_scaler.loss_scale  # after DeepSpeed divided this update's S out

    methods = {"_overflow_check_and_loss_scale_update": _overflow_check_and_scale_update, "_post_step": _post_step}
    optimizer.__class__ = type(f"PerResblockScaled{cls.__name__}", (cls,), methods)
    sync(optimizer)


def sync(optimizer: Any) -> None:
    """Hand DeepSpeed the scaler's S as a static loss scale: at install, and after a checkpoint is loaded
    (DeepSpeed restores the loss scaler it saved, which may be another run's dynamic one)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    if getattr(optimizer.loss_scaler, "dynamic", False) or optimizer.dynamic_loss_scale:
        optimizer.loss_scaler = LossScaler(optimizer.megadalle_scaler.loss_scale)
        optimizer.dynamic_loss_scale = False
    optimizer.loss_scale = optimizer.megadalle_scaler.loss_scale
