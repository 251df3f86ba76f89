"""PowerSGD (engine/powersgd.py) inside DeepSpeed's ZeRO-3 optimizer, as hierarchical sharding (App. E).

train.py builds the model under `zero.Init(data_parallel_group=node_group)`: every parameter is partitioned over
the `parallel.gpus_per_node` ranks of its node group and replicated across node groups, and DeepSpeed's
gradient reduce-scatter runs inside the node group (averaging over it). `install` then replaces the optimizer's
`_get_norm_groups`, which DeepSpeed calls once per update, after its own overflow check (and the per-resblock
scaler's, engine/ds_grad_scaler.py, which leaves every partition carrying the loss scale S) and before it
clips and steps. The replacement

1. checks that every gradient partition is finite (agreed over all ranks); if not, returns an infinite norm,
   which makes DeepSpeed skip the update, and leaves the error buffers alone (App. E.2: added only when finite);
2. averages the partitions over the node groups with PowerSGD (from `powersgd.start_iter` on; before that by
   one uncompressed fp32 all-reduce), in place, keeping S on them;
3. returns the global norm (App. E.2: from the Q' norms and the uncompressed ones, summed over the node group)
   in DeepSpeed's units (times S), which DeepSpeed clips with.

A resblock's matmul weight is compressed, as a matrix, when its rows divide evenly over the node group (ZeRO-3
slices the flattened parameter, so rank j then holds rows [j R/m, (j+1) R/m) of an R x C weight); every other
partition (embeddings, unembeddings, gains, biases, uneven weights) goes uncompressed, as App. E.2 says. ZeRO's
row slices of PyTorch's (out, in) weights are qkv 3d/m x d, proj d/m x d, fc 4d/m x d and the MLP's proj
d/m x 4d, not quite Table 2's shapes: they send r (7m + 9) / (12 d m) of their elements (0.153 for 12B) where
Table 2's shards send r (m + 2) / (2 d m) (0.141). The shard's resblock (its gradient-scale slot) groups
the P and Q' all-reduces. DeepSpeed 0.19.8 internals used (stage3.py): `fp16_groups`,
`__param_id_to_grad_partition`, `_get_norm_groups`, `loss_scale`.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megadalle.engine.grad_scaler import resblocks
from megadalle.engine.metrics import log
from megadalle.engine.powersgd import Collectives, PowerSGD, Shard, Topology


def shards_of(optimizer: Any, model: nn.Module, m: int) -> tuple[list[Shard], list[Any]]:
    """This rank's gradient partitions as PowerSGD shards, in the optimizer's order, and their parameters."""
    parts = optimizer._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
    blocks = resblocks(model) if hasattr(model, "layers") else []
    slot_of = {p.ds_id: i for i, block in enumerate(blocks) for p in block.parameters()}
    names = {p.ds_id: n for n, p in model.named_parameters()}
    shards, params = [], []
    for p in chain(*optimizer.fp16_groups):
        numel = parts[p.ds_id].numel()
        shape = tuple(p.ds_shape)
        matrix = None  # compressed: a resblock's matmul weight whose rows split evenly over the node group
        if p.ds_id in slot_of and len(shape) == 2 and shape[0] % m == 0 and numel * m == shape[0] * shape[1]:
            matrix = (shape[0] // m, shape[1])
        shards.append(Shard(names.get(p.ds_id, f"ds_id {p.ds_id}"), numel, matrix, slot_of.get(p.ds_id, len(blocks))))
        params.append(p)
    return shards, params


def install(
    optimizer: Any,
    model: nn.Module,
    topo: Topology,
    node_group: dist.ProcessGroup,
    cross_group: dist.ProcessGroup,
    rank: int,
    start_iter: int,
    eps: float,
    seed: int,
) -> PowerSGD:
    """Make ZeRO-3's optimizer average gradients across node groups by PowerSGD. `rank` is the paper's r; each
    GPU's shards get r / gpus_per_node. Returns the PowerSGD object (its state goes into checkpoints)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        raise ValueError(f"PowerSGD runs in ZeRO-3's optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "offload_optimizer", False):
        raise ValueError("PowerSGD does not support optimizer offload")
    m = topo.gpus_per_node
    per_gpu = max(1, rank // m)
    shards, params = shards_of(optimizer, model, m)
    device = optimizer.grad_partitions_flat_buffer.device
    psgd = PowerSGD(shards, per_gpu, Collectives(cross_group, topo.n_nodes), seed=seed, eps=eps, device=device)
    optimizer.megadalle_powersgd, optimizer.megadalle_powersgd_params = psgd, params
    optimizer.megadalle_node_group, optimizer.megadalle_start_iter = node_group, start_iter
    optimizer.megadalle_powersgd_node, optimizer.megadalle_powersgd_local = topo.node, topo.local

    def _get_norm_groups(self: Any) -> list[torch.Tensor]:
        parts = self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition  # fetched fresh: rebuilt on reloads
        grads = [parts[p.ds_id] for p in self.megadalle_powersgd_params]
        bad = torch.zeros(1, dtype=torch.uint8, device=device)
        if grads:
            bad[0] = (~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))).any()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank: the skip is global
        if bool(bad[0]):
            return [torch.full((), math.inf, device=device)]
        s = float(self.loss_scale)
        psgd: PowerSGD = self.megadalle_powersgd
        compress = psgd.updates >= self.megadalle_start_iter
        avg, sq = psgd.reduce(grads, [s] * len(grads), compress=compress)
        for g, a in zip(grads, avg):
            g.copy_(a.view_as(g) * s)  # in fp32, then into the partition's dtype (S back on: DeepSpeed divides)
        psgd.updates += 1
        sq = sq.to(device=device, dtype=torch.float64)
        dist.all_reduce(sq, group=self.megadalle_node_group)
        return [(sq.sqrt() * s).float()]

    cls = type(optimizer)
    optimizer.__class__ = type(f"PowerSGD{cls.__name__}", (cls,), {"_get_norm_groups": _get_norm_groups})
    n_matrix = sum(s.matrix is not None for s in shards)
    log.info(
        f"PowerSGD across {topo.n_nodes} node groups of {m}: {len(psgd.compressed)} of {len(shards)} gradient "
        f"shards compressed ({n_matrix} are matrices), rank {per_gpu} a GPU, P and Q' hold "
        f"{psgd.element_rate():.1%} of their elements; uncompressed fp32 until update {start_iter}"
    )
    return psgd
