"""Exponential moving average of parameters, kept on each rank's own shard.

Under ZeRO-3 a rank holds only `p.ds_tensor`, a contiguous slice of the flattened parameter (padded at
the end), so the EMA of a 12B model costs 1/world_size of it per rank. Under ZeRO 0-2 every rank holds
the whole parameter and its whole EMA. `full_state_dict` gathers the average into ordinary tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _is_sharded(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The part of `p` this rank stores: its ZeRO-3 partition, or the parameter itself."""
    return p.ds_tensor if _is_sharded(p) else p.data


class ShardedEMA:
    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.named = [(n, p) for n, p in module.named_parameters()]
        self.shadow = [local_shard(p).detach().float().clone() for _, p in self.named]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        for s, (_, p) in zip(self.shadow, self.named):
            s.lerp_(local_shard(p).detach().float(), 1 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """name -> full fp32 tensor, on every rank (a collective under ZeRO-3)."""
        out = {}
        for s, (name, p) in zip(self.shadow, self.named):
            if _is_sharded(p):
                group = p.ds_process_group  # the ranks p is partitioned over (a node group under PowerSGD)
                parts = [torch.empty_like(s) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, s, group=group)
                out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).clone()  # drop the end padding
            else:
                out[name] = s.clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of full_state_dict: each rank takes its own slice."""
        missing = [n for n, _ in self.named if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for s, (name, p) in zip(self.shadow, self.named):
            full = state[name].float()
            if _is_sharded(p):
                if tuple(full.shape) != tuple(p.ds_shape):
                    raise ValueError(f"EMA {name}: shape {tuple(full.shape)} != parameter {tuple(p.ds_shape)}")
                n, group = s.numel(), p.ds_process_group
                flat = torch.zeros(n * dist.get_world_size(group))
                flat[: full.numel()] = full.flatten()
                rank = dist.get_rank(group)
                s.copy_(flat[rank * n : (rank + 1) * n])
            else:
                if full.shape != s.shape:
                    raise ValueError(f"EMA {name}: shape {tuple(full.shape)} != parameter {tuple(s.shape)}")
                s.copy_(full)
