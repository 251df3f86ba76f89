"""Step schedules. The paper anneals every dVAE quantity with a cosine (linear tau annealing diverged); the prior's
step size warms up linearly to its peak and is then halved on plateaus of the training loss, 5 times (App. B.2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megadalle.config import JobConfig


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """start at step 0, end from `steps` on, half a cosine in between (steps <= 0: `end` at once)."""
    if steps <= 0 or step >= steps:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * max(step, 0) / steps))


def warmup_then(step: int, warmup: int, value: float) -> float:
    """Linear warm-up from 0 to `value` over `warmup` updates (the prior's lr), then `value`."""
    if warmup > 0 and step < warmup:
        return value * (step + 1) / warmup
    return value


@dataclass
class PlateauState:
    smoothed: float | None = None
    """Exponential moving average of the training loss."""
    best: float = math.inf
    """Lowest smoothed loss since the last halving."""
    since_best: int = 0
    """Updates since `best` last improved."""
    halvings: int = 0
    """Halvings applied so far: the lr is peak / 2^halvings."""


class LRSchedule:
    """Step size of update `step` (0-based): linear warm-up over `warmup` updates to `peak`, then
    - "constant": `peak`;
    - "cosine": cosine decay to `floor` over `decay_steps` updates;
    - "plateau": `peak` / 2^h, where h grows by one (at most `max_halvings` times) whenever the smoothed training
      loss (an EMA with factor `smoothing`, observed after warm-up) has not improved on its best by a relative
      `threshold` for `patience` updates. The rule depends only on the loss sequence, which every rank sees
      identically (the loss is reduced over ranks), so all ranks halve at the same update.
    `observe(step, loss)` feeds the loss of each finished update; `state_dict()` goes into checkpoints."""

    scope = "global"  # checkpointed once, in extra.pt (engine/train_state.py)

    def __init__(
        self,
        kind: str,
        peak: float,
        warmup: int = 0,
        floor: float = 0.0,
        decay_steps: int = 0,
        patience: int = 1000,
        threshold: float = 1e-3,
        smoothing: float = 0.99,
        max_halvings: int = 5,
    ) -> None:
        if kind not in ("constant", "cosine", "plateau"):
            raise ValueError(f"lr schedule {kind!r} is not one of constant, cosine, plateau")
        self.kind, self.peak, self.warmup, self.floor, self.decay_steps = kind, peak, warmup, floor, decay_steps
        self.patience, self.threshold, self.smoothing, self.max_halvings = patience, threshold, smoothing, max_halvings
        self.state = PlateauState()

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return warmup_then(step, self.warmup, self.peak)
        if self.kind == "cosine":
            return (
                cosine(step - self.warmup, self.peak, self.floor, self.decay_steps) if self.decay_steps else self.peak
            )
        if self.kind == "plateau":
            return self.peak / 2**self.state.halvings
        return self.peak

    def observe(self, step: int, loss: float) -> None:
        """The training loss of update `step` (0-based); losses of the warm-up and non-finite ones are ignored."""
        if self.kind != "plateau" or step < self.warmup or not math.isfinite(loss):
            return
        s = self.state
        s.smoothed = loss if s.smoothed is None else self.smoothing * s.smoothed + (1 - self.smoothing) * loss
        if s.smoothed < s.best * (1 - self.threshold):
            s.best, s.since_best = s.smoothed, 0
            return
        s.since_best += 1
        if s.since_best >= self.patience and s.halvings < self.max_halvings:
            s.halvings += 1
            s.best, s.since_best = s.smoothed, 0  # the next plateau is measured from here

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = PlateauState(**state)


def lr_schedule(cfg: JobConfig, decay_steps: int) -> LRSchedule:
    """The step-size schedule of the `optim` section; a cosine decays over `decay_steps` after the warm-up."""
    o = cfg.optim
    return LRSchedule(
        o.schedule, o.lr, o.warmup_steps, o.lr_min, decay_steps, o.plateau_patience, o.plateau_threshold,
        o.plateau_smoothing, o.max_halvings,
    )  # fmt: skip
