"""Whole-model gathers for tests only: they compare a sharded run with a plain one. The package itself never
gathers the model (STYLE rule 19); these helpers are collectives under ZeRO-3."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megadalle.engine.ema import ShardedEMA


def gathered_params(engine) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the live weights, on every rank."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_tensor")):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


@torch.no_grad()
def gathered_ema(ema: ShardedEMA) -> dict[str, torch.Tensor]:
    """name -> whole fp32 EMA tensor, on every rank."""
    out = {}
    for s, (name, p) in zip(ema.shadow, ema.named):
        if hasattr(p, "ds_tensor"):
            group = p.ds_process_group
            parts = [torch.empty_like(s) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, s, group=group)
            out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).clone()
        else:
            out[name] = s.clone()
    return out
