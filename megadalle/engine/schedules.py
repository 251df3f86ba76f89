"""Step schedules. The paper anneals every dVAE quantity with a cosine (linear tau annealing diverged)."""

from __future__ import annotations

import math


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
