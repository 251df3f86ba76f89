"""Optimizer parameter groups, chosen by module type (never by `p.dim()`, which ZeRO-3's placeholders flatten to
1-D, nor by name substrings): the weights of matmuls and convolutions decay; gains, biases, embeddings and
unembeddings do not (App. B.2's weight decay is a regulariser of the matmul weights)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megadalle.models.dvae import Conv2d as DVAEConv2d
from megadalle.models.transformer import FP32Head

DECAYED_WEIGHT: dict[type[nn.Module], str] = {nn.Linear: "weight", nn.Conv2d: "weight", DVAEConv2d: "w"}
"""Module type -> the name of its parameter that decays."""
NEVER_DECAYED: tuple[type[nn.Module], ...] = (FP32Head,)
"""Linear subclasses that are unembeddings."""


def decays(module: nn.Module, param_name: str) -> bool:
    """Whether `module`'s own parameter `param_name` belongs to the weight-decay group."""
    if isinstance(module, NEVER_DECAYED):
        return False
    return any(isinstance(module, t) and param_name == name for t, name in DECAYED_WEIGHT.items())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[decayed, not decayed] groups covering every trainable parameter exactly once, in model order. Each group
    carries a `name`, so tests and logs can tell them apart, and a `kind`: "matrix" (the matmul and conv weights,
    which get the paper's 16-bit Adam moments, engine/adam16.py, whatever `weight_decay` is) or "other"."""
    decay: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (decay if decays(module, name) else rest).append(p)
    if not decay:
        raise ValueError(f"{type(model).__name__}: no parameter to decay (no Linear or conv weight found)")
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "kind": "matrix"},
        {"name": "no_decay", "params": rest, "weight_decay": 0.0, "kind": "other"},
    ]


def reset_moments(optimizer: torch.optim.Optimizer) -> int:
    """Forget the per-parameter state (Adam's moments and step count) of the innermost torch optimizer under
    DeepSpeed's wrappers (ZeRO's flat partitions included), in place: the next step starts it afresh, as at
    initialisation. Returns how many parameter tensors had state.

    DeepSpeed's ZeRO-1/2 and bf16 wrappers link views of the state into each parameter's fp32 fragment once
    (`_hp_optimizer_states_linked`); the flag is cleared so that the next step links the new state, not the old."""
    inner = optimizer
    while True:
        if getattr(inner, "_hp_optimizer_states_linked", False):
            inner._hp_optimizer_states_linked = False
        if not isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            break
        inner = inner.optimizer
    n = sum(1 for s in inner.state.values() if s)
    inner.state.clear()
    return n


def group_names(model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, list[str]]:
    """group name -> parameter names (for tests and the startup log)."""
    name_of = {p: n for n, p in model.named_parameters()}
    return {g["name"]: [name_of[p] for p in g["params"]] for g in groups}
