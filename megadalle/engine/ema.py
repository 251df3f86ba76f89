"""Exponential moving average of parameters, kept on each rank's own shard, and never gathered whole.

Under ZeRO-3 a rank holds only `p.ds_tensor`, a contiguous slice of the flattened parameter (padded at the end,
ceil(numel / shards) elements each), so the EMA of a 12B model costs 1/shards of it per rank; the shards are the
ranks of `p.ds_process_group` (the world, or a node group under PowerSGD, whose copies the other node groups
hold). Under ZeRO 0-2 every rank holds the whole parameter and its whole EMA: one shard.

The EMA leaves a rank in two ways only: its shard (`state_dict`, written by the checkpoint module, one file per
shard), and swapped into the parameters' own storage for an evaluation (`swapped_in`), where the forward gathers
it layer by layer as it gathers the live weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _is_sharded(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The part of `p` this rank stores: its ZeRO-3 partition, or the parameter itself."""
    return p.ds_tensor if _is_sharded(p) else p.data


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if _is_sharded(p) else tuple(p.shape)


def shard_slice(whole: torch.Tensor, shard: int, shards: int) -> torch.Tensor:
    """Shard `shard` of `shards` of a whole tensor as ZeRO-3 lays it out: ceil(numel / shards) elements of the
    flattened tensor, the last shards padded with zeros."""
    flat = whole.reshape(-1)
    part = -(-flat.numel() // shards)
    out = torch.zeros(part, dtype=whole.dtype)
    piece = flat[shard * part : (shard + 1) * part]
    out[: piece.numel()] = piece
    return out


class ShardedEMA:
    """The EMA of a module's parameters, on this rank's shards; checkpointed per shard group (engine/train_state.py):
    one file per rank of the first shard group, whose copies the other node groups hold under PowerSGD."""

    scope = "shard_group"

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.named = [(n, p) for n, p in module.named_parameters()]
        self.shadow = [local_shard(p).detach().float().clone() for _, p in self.named]
        self.updates = 0
        groups = {id(p.ds_process_group): p.ds_process_group for _, p in self.named if _is_sharded(p)}
        if len(groups) > 1:
            raise ValueError(f"the parameters are partitioned over {len(groups)} different process groups")
        group = next(iter(groups.values()), None)
        self.shard, self.shards = (dist.get_rank(group), dist.get_world_size(group)) if group else (0, 1)

    @property
    def writes(self) -> bool:
        """Whether this rank writes its shard into a checkpoint: the ranks of the first shard group (ranks
        0 .. shards - 1; the node groups of engine/powersgd.py are consecutive ranks)."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return rank < self.shards

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> the whole parameter's shape."""
        return {name: full_shape(p) for name, p in self.named}

    @torch.no_grad()
    def update(self) -> None:
        for s, (_, p) in zip(self.shadow, self.named):
            s.lerp_(local_shard(p).detach().float(), 1 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: {"updates", "shard", "shards", "tensors": name -> flat fp32 partition (the live
        tensors, not copies)}."""
        tensors = {name: s for s, (name, _) in zip(self.shadow, self.named)}
        return {"updates": self.updates, "shard": self.shard, "shards": self.shards, "tensors": tensors}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A `state_dict` of the same shard layout."""
        if (state.get("shard"), state.get("shards")) != (self.shard, self.shards):
            raise ValueError(f"EMA shard {state.get('shard')} of {state.get('shards')} given to shard {self.shard} "
                             f"of {self.shards}")  # fmt: skip
        tensors = state["tensors"]
        missing = [n for n, _ in self.named if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for s, (name, _) in zip(self.shadow, self.named):
            if tensors[name].numel() != s.numel():
                raise ValueError(f"EMA {name}: {tensors[name].numel()} elements in the shard, {s.numel()} expected")
            s.copy_(tensors[name].reshape(s.shape))
        self.updates = int(state.get("updates", 0))

    @torch.no_grad()
    def load_whole(self, name: str, whole: torch.Tensor) -> None:
        """Set one parameter's EMA from its whole tensor (this rank keeps its slice): a streaming load of a
        checkpoint written with another shard layout, or of an old one with whole weights."""
        i = next((i for i, (n, _) in enumerate(self.named) if n == name), None)
        if i is None:
            raise KeyError(f"EMA has no parameter {name!r}")
        p, s = self.named[i][1], self.shadow[i]
        if tuple(whole.shape) != full_shape(p):
            raise ValueError(f"EMA {name}: shape {tuple(whole.shape)} != parameter {full_shape(p)}")
        s.copy_(shard_slice(whole.float(), self.shard, self.shards) if _is_sharded(p) else whole.float())

    @contextmanager
    def swapped_in(self, optimizer: Any = None) -> Iterator[None]:
        """Collective under ZeRO-3. The EMA in the parameters' own storage (cast to their dtype) for the body, the
        live values back afterwards bit for bit: one extra shard of memory, no whole copy (at ZeRO 0-2, where every
        rank holds the whole model, its copy waits in host memory). `optimizer`: DeepSpeed's
        ZeRO-3 optimizer, whose persistent (small, never released) parameters are gathered again from the swapped
        shards, as it does after a step."""
        sharded = any(_is_sharded(p) for _, p in self.named)
        if sharded and optimizer is None:
            raise ValueError("swapping the EMA into ZeRO-3 parameters needs the DeepSpeed optimizer")
        # the live values: a shard under ZeRO-3; at ZeRO 0-2 the whole parameters, kept in host memory
        live = [local_shard(p).detach().clone() if sharded else p.detach().to("cpu", copy=True) for _, p in self.named]
        try:
            self._copy_in(self.shadow, optimizer if sharded else None)
            yield
        finally:
            self._copy_in(live, optimizer if sharded else None)

    @torch.no_grad()
    def _copy_in(self, values: list[torch.Tensor], optimizer: Any) -> None:
        if optimizer is not None:
            optimizer.checkpoint_event_prologue()  # every parameter released to its shard, persistent ones too
        for v, (_, p) in zip(values, self.named):
            local_shard(p).copy_(v.reshape(local_shard(p).shape))
        if optimizer is not None:
            optimizer.checkpoint_event_epilogue()  # the persistent parameters gathered from the new shards
