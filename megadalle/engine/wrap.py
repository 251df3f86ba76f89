"""Training techniques applied to a model from outside, in one place (torchtitan's `apply_ac`): the model keeps
only its math and exposes a seam, `model.run_block(block, x)`, through which every resblock is called. Each
technique composes a wrapper around it. The per-resblock gradient scaler (fp16, engine/grad_scaler.py) is one
more technique (`apply_grad_scaler`: it replaces each resblock's `residual` join, so blocks keep their
`__call__`), applied under fp16 with `train.grad_scaler = per_resblock`; train.py installs its DeepSpeed side
(engine/ds_grad_scaler.py) after `deepspeed.initialize`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megadalle.config import ConfigError, JobConfig
from megadalle.engine.grad_scaler import apply_grad_scaler
from megadalle.models.transformer import BlockRunner, DallePrior


def checkpointed(inner: BlockRunner) -> BlockRunner:
    """Recompute the resblock's activations in backward instead of storing them (training mode only). The block
    is called through its `__call__`, so ZeRO-3 gathers its parameters again for the recomputation."""

    def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not block.training:
            return inner(block, x)
        return checkpoint(inner, block, x, use_reentrant=False)

    return run


def apply_activation_checkpointing(model: DallePrior) -> DallePrior:
    """Checkpoint every resblock of a model that has the `run_block` seam (the prior)."""
    model.run_block = checkpointed(model.run_block)
    return model


def apply_wrappers(model: nn.Module, cfg: JobConfig, grad_scaler: str = "off") -> nn.Module:
    """Every training wrapper the job asks for, in one place (train.py calls this once, before DeepSpeed).
    `grad_scaler`: the resolved mode (engine/ds_config.py's `grad_scaler_mode`)."""
    if cfg.train.activation_checkpointing:
        if not isinstance(model, DallePrior):
            raise ConfigError(
                f"train.activation_checkpointing: {type(model).__name__} (job.stage={cfg.job.stage}) has no "
                "resblock seam; activation checkpointing covers the prior"
            )
        apply_activation_checkpointing(model)
    if grad_scaler == "per_resblock":
        if not isinstance(model, DallePrior):
            raise ConfigError(f"train.grad_scaler = per_resblock: {type(model).__name__} has no resblocks")
        model.grad_scaler = apply_grad_scaler(model)
    return model
