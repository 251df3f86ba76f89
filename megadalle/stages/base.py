"""The stage protocol: what `megadalle/train.py` needs from each trainable model (dvae, prior, clip).

Losses and the global batch: `counts(batch)` gives this micro-batch's normalisers (always "samples"; the prior
adds its text and image target counts). train.py sums them over the update's micro-batches and over all ranks
into `totals`, and `loss(model, batch, sched, totals)` returns this micro-batch's *share* of the global-batch
objective (a sum over the micro-batch divided by a global total), so that the shares of every micro-batch on
every rank add up to the objective of the whole batch. Statistics are shares in the same sense: train.py sums
them. train.py alone calls backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

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

    def evaluate(self, state: dict[str, torch.Tensor], step: int, out_dir: Path) -> dict[str, float]:
        """Validation metrics with the given (EMA) weights, on rank 0."""


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
