"""Training stages: one registry, keyed by `job.stage` (imported lazily: each stage pulls its own models)."""

from __future__ import annotations

import importlib

from megadalle.config import ConfigError, JobConfig
from megadalle.stages.base import Stage

STAGES: dict[str, str] = {
    "dvae": "megadalle.stages.dvae:DVAEStage",
    "prior": "megadalle.stages.prior:PriorStage",
    "clip": "megadalle.stages.clip:ClipStage",
}


def make_stage(cfg: JobConfig) -> Stage:
    if cfg.job.stage not in STAGES:
        raise ConfigError(f"job.stage={cfg.job.stage!r} is not one of {', '.join(STAGES)}")
    module, cls = STAGES[cfg.job.stage].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
