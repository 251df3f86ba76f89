"""The stage protocol: what `megadalle/train.py` needs from each trainable model (dvae, prior, clip).

Losses and the global batch: `counts(batch)` gives this micro-batch's normalisers (always "samples"; the prior
adds its text and image target counts). train.py sums them over the update's micro-batches and over all ranks
into `totals`, and `loss(model, batch, sched, totals)` returns this micro-batch's *share* of the global-batch
objective (a sum over the micro-batch divided by a global total), so that the shares of every micro-batch on
every rank add up to the objective of the whole batch. Statistics are shares in the same sense: train.py sums
them. train.py alone calls backward.

Evaluation: `evaluate(model, step, out_dir, device)` is collective. Every rank calls it with the model to evaluate,
in eval mode under no_grad: during training DeepSpeed's `engine.module` with the EMA swapped into its own
parameter storage (train.py's `_evaluate`; under ZeRO-3 each rank holds its shards only and every module call
gathers the parameters it needs, so no rank ever holds the whole model), in a single process a plain model.
Batch i of each split is evaluated on rank i % world (`eval_share`), the sums are added over ranks, and every rank
returns the same metrics, equal to one process's to float rounding. Training precision: under bf16/fp16 the module
computes as the training forward does (its parameters' dtype, the engine's autocast).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from megadalle.data.loader import SkipCounter
from megadalle.engine.schedules import LRSchedule


class Stage(Protocol):
    readable: list[str]
    """Metric names on the readable rank-0 line."""
    skips: SkipCounter
    lr_schedule: LRSchedule
    moments_reset_step: int | None
    """Update (0-based) before which train.py zeroes the optimizer's moments, where the objective changes (the
    dVAE's warm start ends: its gradients' scale changes with it); None: never."""

    def build_model(self) -> nn.Module:
        """The plain model (train.py builds it under zero.Init for ZeRO-3)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups (engine/optim.py: by module type)."""

    def schedules(self, step: int) -> dict[str, float]:
        """Every scheduled quantity of update `step` (0-based), "lr" included."""

    def batches(self, rank: int, state: dict[str, Any] | None = None) -> Iterator[Any]:
        """Endless training micro-batches for this rank, on the CPU, from `state` (a `loader_state()`) when given."""

    def loader_state(self) -> dict[str, Any]:
        """Where the training stream stands (each loader worker's position, the BPE-dropout rng): checkpointed per
        rank, so that a resume neither repeats nor skips data beyond data/stream.py's window."""

    def counts(self, batch: Any) -> dict[str, torch.Tensor | float]:
        """This micro-batch's normalisers ("samples", ...), summed over the update by train.py."""

    def loss(
        self, model: nn.Module, batch: Any, sched: dict[str, float], totals: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(this micro-batch's share of the global objective, detached statistics as shares)."""

    def throughput(self, samples_per_s: float) -> dict[str, float]:
        """Stage-specific rates for the metrics line (tokens/s, TFLOP/s); may be empty."""

    def evaluate(
        self, model: nn.Module, step: int, out_dir: Path, device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """Collective: validation metrics of `model` (see the module docstring), the same on every rank. Eval batches
        go to `device` (the engine's: a ZeRO-3 parameter's own `.device` says nothing of where it is gathered);
        every rank makes the same sequence of model calls, a rank without a batch of its own in the last round on a
        stand-in (ZeRO-3 gathers parameters collectively in each call). Images (grids) are written by rank 0."""


T = TypeVar("T")


def eval_share(batches: Iterable[T], rank: int, world: int) -> Iterator[tuple[int, T, bool]]:
    """This rank's share of an evaluation's batches: (i, batch i, True) for i = rank, rank + world, ... . Every rank
    yields the same number of items, ceil(n / world) for n batches: in a last, partial round a rank without a batch
    gets the round's first batch as a stand-in, (its index, batch, False), to make the same model calls as the others
    and add nothing to the sums. Every rank reads every batch, in the same order (the evaluation splits are small),
    and keeps two of them at most."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    first: T | None = None
    mine: T | None = None
    n = 0
    for i, batch in enumerate(batches):
        j = i % world  # the batch's place in its round
        if j == 0:
            first, mine = batch, None
        if j == rank:
            mine = batch
        if j == world - 1:
            yield i - j + rank, mine, True
        n = i + 1
    if n % world:  # a partial last round, from batch `start`
        start = n - n % world
        yield (start + rank, mine, True) if start + rank < n else (start, first, False)


class StreamedData:
    """The training stream's state for a stage whose `batches` sets `self.stream` (and maybe has a tokenizer)."""

    stream: Any = None
    moments_reset_step: int | None = None

    def loader_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"stream": self.stream.state() if self.stream is not None else None}
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            state["tokenizer_rng"] = tokenizer.rng.getstate()
        return state

    def _restore(self, state: dict[str, Any] | None) -> None:
        """Apply `state` to the stream just built (and the tokenizer): a resume."""
        if not state:
            return
        if state.get("stream") is not None:
            self.stream.load_state(state["stream"])
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None and state.get("tokenizer_rng") is not None:
            version, internal, gauss = state["tokenizer_rng"]
            tokenizer.rng.setstate((version, tuple(internal), gauss))
