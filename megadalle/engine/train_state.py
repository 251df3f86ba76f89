"""Every stateful part of a training run in one typed object (STYLE rule 16), each declaring the scope the checkpoint
module (engine/checkpoint.py, which alone knows the file names) stores it in:

- "global": identical on every rank (its updates are agreed by collectives), stored once, by rank 0, in extra.pt:
  the lr schedule, the per-resblock gradient scales;
- "shard_group": one file per rank of the first shard group, whose copies the other groups hold (`shard` of
  `shards`, written where `writes`): the EMA's shards (the ZeRO-3 partition group: the world, or a node group under
  PowerSGD; one shard at ZeRO 0-2) and PowerSGD's error buffers summed over the node groups (App. E.2: one file
  per local ordinal, written by node group 0);
- "rank": one file per rank: its data position and random generators.

DeepSpeed's engine (weights, optimizer, its own loss scaler) writes its own files beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from megadalle.engine.ema import ShardedEMA
from megadalle.engine.rng import rng_state, set_rng_state
from megadalle.engine.schedules import LRSchedule

Scope = Literal["global", "shard_group", "rank"]


class Stateful(Protocol):
    scope: Scope

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        """May return False for a state of an older megadalle that could not be mapped (it restarted)."""


class RandomGenerators:
    """Python's, NumPy's and torch's generators of this process (engine/rng.py)."""

    scope: Scope = "rank"

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class DataPosition:
    """Where this rank's training stream stands (the stage's `loader_state`). A loaded position waits in `loaded`
    until the stream is built from it (`stage.batches(rank, loaded)`)."""

    scope: Scope = "rank"

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.stage.loader_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


class PowerSGDState:
    """PowerSGD's update count and error buffers as App. E.2 checkpoints them: summed over the node groups (a
    collective: every rank calls `state_dict`), one file per local ordinal, written by node group 0; loaded, each
    rank takes the summed buffers of its local ordinal (engine/powersgd.py)."""

    scope: Scope = "shard_group"

    def __init__(self, psgd: Any, node: int, local: int, gpus_per_node: int) -> None:
        self.psgd = psgd
        self.shard, self.shards, self.writes = local, gpus_per_node, node == 0

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.psgd.updates, "buffers": self.psgd.summed_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.psgd.updates = int(state["updates"])  # the same on every rank: one compress decision
        self.psgd.load_summed_state(state["buffers"])


@dataclass
class TrainState:
    """What train.py's `build` returns: the DeepSpeed engine and its optimizer, and every part a checkpoint holds
    beside DeepSpeed's own files (`parts`, by their names in the checkpoint)."""

    engine: Any
    optimizer: Any
    lr_schedule: LRSchedule
    data: DataPosition | None
    ema: ShardedEMA | None = None
    grad_scaler: Any = None
    """engine/grad_scaler.py's per-resblock scales, where train.grad_scaler = per_resblock."""
    powersgd: PowerSGDState | None = None
    rng: RandomGenerators | None = field(default_factory=RandomGenerators)

    def parts(self) -> dict[str, Stateful]:
        named: dict[str, Any] = {"lr_schedule": self.lr_schedule, "grad_scaler": self.grad_scaler, "ema": self.ema,
                                 "powersgd": self.powersgd, "loader": self.data, "rng": self.rng}  # fmt: skip
        return {name: part for name, part in named.items() if part is not None}
