"""PowerSGD gradient compression across node groups (Ramesh et al. 2021, Sec. 2.5, App. E.1-E.2).

Parameters are sharded inside a node group of `gpus_per_node` ranks and replicated across the `n_nodes` node
groups; ranks with the same local ordinal on different nodes hold the same shards and form a cross group. Each
update, after the gradients were reduce-scattered (and averaged) inside the node group and found finite, every
rank calls `PowerSGD.reduce` on its shards, which averages them over its cross group:

- a compressed shard G (a x b as a matrix, transposed so that a <= b) has a fixed Gaussian Q (b x r) drawn once
  from a seed shared by all ranks (never resampled: that hurt badly, App. E.2) and an error buffer E (a x b) in
  the 1-6-9 format (kernels/powersgd.py); E += G / s (s: the shard's gradient scale: its resblock's, or the loss
  scale outside the resblocks); P = E Q; one all-reduce of the P of all shards of a resblock (1-6-9 on the wire,
  infinities clamped: a reduce-scatter of codes and an all-gather of their re-encoded sums); P <-
  orthogonalize(P + eps I); Q' = E^T P; one all-reduce of those Q' (1-6-9); the
  averaged gradient is P Q'^T / n_nodes, and E -= P Q'^T / n_nodes (an E entry that is not finite is zeroed);
- the other shards (embeddings, gains, biases, and matrices too small to gain) are unscaled and averaged in one
  fp32 all-reduce;
- the global norm is sqrt(sum ||Q'||^2 / n_nodes^2 + ||uncompressed||^2) summed over the node group (P is
  orthonormal, so ||P Q'^T|| = ||Q'||).

r per shard is the paper's rank divided by `gpus_per_node` ("112 a GPU" for r = 896 on 8 GPUs), so a
transformer's shards (Table 2: d x d/m, d x 4d/m, 4d/m x d) send r (m + 2) / (2 d m) of their elements.
In the 16-bit all-reduce each rank sums one chunk of everyone's codes in rank order and re-encodes it, so all
ranks get the same bits. `Collectives` counts the bytes each rank sends across node groups. The operations are
kernels/powersgd.py's Triton kernels on a GPU and their PyTorch references on the CPU (`ops_for`; P is orthogonalised
by torch.linalg.qr on both, cuSOLVER on a GPU, unless `ops` says otherwise).

Checkpoints (App. E.2) keep, per local ordinal, the sum of the error buffers over the node groups; a resume
divides it by the number of node groups and gives it to every node group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels.powersgd import Ops, ops_for


@dataclass(frozen=True)
class Topology:
    """world = n_nodes * gpus_per_node ranks; rank = node * gpus_per_node + local."""

    world: int
    gpus_per_node: int
    rank: int

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.world % self.gpus_per_node:
            raise ValueError(f"world size {self.world} is not a multiple of gpus_per_node {self.gpus_per_node}")

    @property
    def n_nodes(self) -> int:
        return self.world // self.gpus_per_node

    @property
    def node(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def local(self) -> int:
        return self.rank % self.gpus_per_node

    def node_ranks(self, node: int) -> list[int]:
        return list(range(node * self.gpus_per_node, (node + 1) * self.gpus_per_node))

    def cross_ranks(self, local: int) -> list[int]:
        return list(range(local, self.world, self.gpus_per_node))


def new_groups(topo: Topology) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(this rank's node group, its cross group). Every rank creates every group, in the same order."""
    node_group = cross_group = None
    for node in range(topo.n_nodes):
        g = dist.new_group(topo.node_ranks(node))
        node_group = g if node == topo.node else node_group
    for local in range(topo.gpus_per_node):
        g = dist.new_group(topo.cross_ranks(local))
        cross_group = g if local == topo.local else cross_group
    return node_group, cross_group


@dataclass
class Collectives:
    """The collectives across node groups, counting the bytes this rank sends: a reduce-scatter followed by an
    all-gather (the bandwidth-optimal all-reduce) sends 2 (n - 1) / n of the payload."""

    group: dist.ProcessGroup | None
    size: int
    bytes_sent: int = 0

    def all_reduce_fp32(self, x: torch.Tensor, count: bool = True) -> None:
        if count:
            self._count(x.numel() * x.element_size())
        if self.size > 1:
            dist.all_reduce(x, group=self.group)

    def all_reduce_169(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group of fp32 `x`, 16 bits on the wire: the codes are reduce-scattered (all_to_all:
        rank j receives chunk j of every rank's codes, decodes them and sums them in rank order), the sums encoded
        again and all-gathered, so every rank decodes the same bits."""
        ops = ops_for(x.device)
        codes = ops.encode(x.contiguous().reshape(-1))
        n = self.size
        self._count(codes.numel() * codes.element_size())
        if n == 1:
            return ops.decode(codes)
        chunk = -(-codes.numel() // n)
        padded = torch.zeros(chunk * n, dtype=torch.int16, device=codes.device)
        padded[: codes.numel()] = codes
        received = torch.empty_like(padded)
        dist.all_to_all_single(received.view(torch.uint8), padded.view(torch.uint8), group=self.group)
        parts = received.view(n, chunk)  # (sender, chunk): my chunk from every rank
        total = ops.decode(parts[0].contiguous())
        for r in range(1, n):
            total += ops.decode(parts[r].contiguous())
        mine = ops.encode(total)
        gathered = torch.empty(n * chunk, dtype=torch.int16, device=codes.device)
        dist.all_gather_into_tensor(gathered.view(torch.uint8), mine.view(torch.uint8), group=self.group)
        return ops.decode(gathered[: codes.numel()]).view_as(x)

    def _count(self, payload_bytes: int) -> None:
        self.bytes_sent += 2 * (self.size - 1) * payload_bytes // self.size if self.size > 1 else 0


@dataclass
class Shard:
    """One gradient shard this rank reduces: `numel` elements, as a (rows, cols) matrix when it may be compressed
    (None: never), and its gradient-scale slot (a resblock's index; any other index: outside the resblocks)."""

    name: str
    numel: int
    matrix: tuple[int, int] | None
    slot: int


@dataclass
class _Compressed:
    index: int
    rows: int
    cols: int
    transposed: bool
    q: torch.Tensor  # (cols, r) fixed
    e: torch.Tensor  # (rows, cols) 1-6-9 codes

    @property
    def rank(self) -> int:
        return self.q.shape[1]


class PowerSGD:
    """Compressed cross-node averaging of this rank's gradient shards (see the module docstring)."""

    def __init__(
        self,
        shards: list[Shard],
        rank: int,
        comm: Collectives,
        seed: int = 0,
        eps: float = 1e-6,
        device: torch.device | str = "cpu",
        ops: Ops | None = None,
    ) -> None:
        if rank < 1:
            raise ValueError(f"powersgd rank must be >= 1, got {rank}")
        self.shards, self.comm, self.eps = shards, comm, eps
        self.ops: Ops = ops or ops_for(device)  # (tests give the CPU the Triton kernels, under the interpreter)
        self.compressed: list[_Compressed] = []
        for i, s in enumerate(shards):
            if s.matrix is None:
                continue
            a, b = s.matrix
            if a * b != s.numel:
                raise ValueError(f"shard {s.name}: matrix {s.matrix} does not hold its {s.numel} elements")
            transposed = a > b
            rows, cols = (b, a) if transposed else (a, b)
            r = min(rank, rows)
            if r * (rows + cols) >= rows * cols:  # P and Q' would not be smaller than the shard
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)  # the same on every rank holding this shard
            q = torch.randn(cols, r, generator=g).to(device)
            e = torch.zeros(rows, cols, dtype=torch.int16, device=device)  # 1-6-9 zero
            self.compressed.append(_Compressed(i, rows, cols, transposed, q, e))
        self._is_compressed = {c.index for c in self.compressed}
        self.updates = 0
        """Averagings done (the caller counts them, for `powersgd.start_iter`; checkpointed with the buffers)."""

    @property
    def n_nodes(self) -> int:
        return self.comm.size

    def element_rate(self) -> float:
        """Elements sent for P and Q' over the elements of the compressed shards."""
        sent = sum(c.rank * (c.rows + c.cols) for c in self.compressed)
        full = sum(c.rows * c.cols for c in self.compressed)
        return sent / full if full else 1.0

    def reduce(
        self, grads: list[torch.Tensor], scales: list[float], compress: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """grads: this rank's finite shards (flat, fp32, averaged inside the node, carrying scales[i]) -> (the
        shards averaged over node groups and unscaled, fp32; this rank's part of the squared global norm). With
        `compress` False every shard goes through the fp32 all-reduce and the error buffers are left alone."""
        if len(grads) != len(self.shards) or len(scales) != len(self.shards):
            raise ValueError(f"expected {len(self.shards)} shards and scales, got {len(grads)} and {len(scales)}")
        n, ops = self.n_nodes, self.ops
        out: list[torch.Tensor | None] = [None] * len(grads)
        # uncompressed: unscaled, one fp32 all-reduce
        plain = [i for i in range(len(grads)) if i not in self._is_compressed or not compress]
        sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
        if plain:
            flat = torch.cat([grads[i].float().reshape(-1) / scales[i] for i in plain])
            self.comm.all_reduce_fp32(flat)
            flat /= n
            sq += flat.double().square().sum()
            for i, part in zip(plain, flat.split([self.shards[i].numel for i in plain])):
                out[i] = part
        # compressed, one resblock at a time (one all-reduce of P and one of Q' each; E decoded once)
        by_slot: dict[int, list[_Compressed]] = {}
        for c in self.compressed if compress else []:
            by_slot.setdefault(self.shards[c.index].slot, []).append(c)
        for group in by_slot.values():
            es = []
            for c in group:
                g = grads[c.index].float()
                g = g.view(c.cols, c.rows).T if c.transposed else g.view(c.rows, c.cols)
                ops.error_feedback_add_(c.e, g.contiguous(), scales[c.index])
                es.append(ops.decode(c.e))  # (rows, cols): E as stored
            ps = [e @ c.q for e, c in zip(es, group)]  # P (rows, r)
            summed = self.comm.all_reduce_169(torch.cat([p.reshape(-1) for p in ps]))
            ps = [ops.orthogonalize(p.view(c.rows, c.rank), self.eps) for c, p in zip(group, summed.split(
                [p.numel() for p in ps]))]  # fmt: skip
            qs = [e.T @ p for e, p in zip(es, ps)]  # Q' (cols, r)
            summed = self.comm.all_reduce_169(torch.cat([q.reshape(-1) for q in qs]))
            for c, p, q in zip(group, ps, summed.split([q.numel() for q in qs])):
                q = q.view(c.cols, c.rank)
                sq += q.double().square().sum() / n**2
                d = ops.decompress_update_(c.e, p, q, n)  # (rows, cols): the average; E -= it
                out[c.index] = (d.T if c.transposed else d).reshape(-1)
        assert all(o is not None for o in out)
        return out, sq  # type: ignore[return-value]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's error buffers, decoded (fp32)."""
        return {self.shards[c.index].name: self.ops.decode(c.e) for c in self.compressed}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = {self.shards[c.index].name: c for c in self.compressed}
        missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        if missing or unexpected:
            raise ValueError(f"PowerSGD state: missing error buffers {missing}, unexpected {unexpected}")
        for name, c in names.items():
            if state[name].shape != c.e.shape:
                raise ValueError(f"PowerSGD state: {name} has shape {tuple(state[name].shape)}, expected "
                                 f"{tuple(c.e.shape)}")  # fmt: skip
            c.e.copy_(self.ops.encode(state[name].float().to(c.e.device)))

    def summed_state(self) -> dict[str, torch.Tensor]:
        """App. E.2's checkpoint: the sum of the error buffers over the node groups (every rank gets it; one per
        local ordinal needs to be saved)."""
        state = self.state_dict()
        for t in state.values():
            self.comm.all_reduce_fp32(t, count=False)  # (not gradient traffic)
        return state

    def load_summed_state(self, state: dict[str, torch.Tensor]) -> None:
        """Resume from `summed_state`: each node group takes the sum divided by the number of node groups."""
        self.load_state_dict({k: v / self.n_nodes for k, v in state.items()})
