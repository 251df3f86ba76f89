"""One way from a checkpoint to a trained model, for the three stages: the dVAE, the prior and the contrastive
reranker. Used for sampling, evaluation and encoding shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from megadalle.config import JobConfig
from megadalle.engine.checkpoint import open_eval_weights

Stage = Literal["dvae", "prior", "clip"]

# The stage modules are imported when a model is built, not here: they load checkpoints through this module,
# so importing them at the top would make an import cycle.


def _build_dvae(cfg: JobConfig) -> nn.Module:
    from megadalle.models.dvae import DiscreteVAE
    from megadalle.stages.dvae import dvae_args

    return DiscreteVAE(dvae_args(cfg))


def _build_prior(cfg: JobConfig) -> nn.Module:
    from megadalle.models.transformer import DallePrior
    from megadalle.stages.prior import prior_args

    return DallePrior(prior_args(cfg), "auto")  # the weights do not depend on it; `auto` suits any device


def _build_clip(cfg: JobConfig) -> nn.Module:
    from megadalle.models.clip import ContrastiveModel
    from megadalle.stages.clip import clip_args

    return ContrastiveModel(clip_args(cfg))


BUILDERS: dict[str, Callable[[JobConfig], nn.Module]] = {
    "dvae": _build_dvae,
    "prior": _build_prior,
    "clip": _build_clip,
}


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu; any other torch device name as given, if it exists here."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N): {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked but no CUDA device is available here (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} was asked but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def _listed(keys: list[str], limit: int = 10) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_trained(
    checkpoint: str | Path, stage: Stage, device: str | torch.device = "cpu"
) -> tuple[nn.Module, JobConfig]:
    """The model of a checkpoint (EMA weights where the run kept them) and the config it was trained with.

    `checkpoint` is a checkpoint folder, its extra.pt, or a run's checkpoints/ folder (its newest complete
    checkpoint). The model is built from the stored config, loaded strictly (missing, unexpected and misshapen keys
    are a ValueError naming the checkpoint), in eval mode with gradients off, on `device`."""
    if stage not in BUILDERS:
        raise ValueError(f"unknown stage {stage!r} (known: {sorted(BUILDERS)})")
    weights = open_eval_weights(checkpoint)
    cfg = weights.cfg
    if cfg.job.stage != stage:
        raise ValueError(
            f"checkpoint {checkpoint} holds a {cfg.job.stage!r} model (job.stage) but {stage!r} was expected"
        )
    model = BUILDERS[stage](cfg)
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.shapes.keys())
    unexpected = sorted(weights.shapes.keys() - expected.keys())
    shapes = [f"{k} {weights.shapes[k]} != {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & weights.shapes.keys())
              if tuple(weights.shapes[k]) != tuple(expected[k].shape)]  # fmt: skip
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the {stage} model built from its config: "
            f"{len(missing)} missing keys [{_listed(missing)}], {len(unexpected)} unexpected keys "
            f"[{_listed(unexpected)}], {len(shapes)} shape mismatches (checkpoint != model) [{_listed(shapes)}]"
        )
    with torch.no_grad():  # one tensor in flight: the model plus its largest tensor, never a second copy
        for name, tensor in weights.items():
            expected[name].copy_(tensor)
    model.eval().requires_grad_(False)
    return model.to(resolve_device(device)), cfg
