"""Layers that initialise their own parameters in `reset_parameters`, which their constructor calls.

ZeRO-3's `zero.Init` partitions every module as soon as its constructor returns, so a parent that re-initialises
a child's weight afterwards (`nn.init.normal_(self.fc.weight)` in the parent's __init__) writes into an empty
placeholder and the model silently keeps PyTorch's default initialisation. These classes carry their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear initialised N(0, std) with a zero bias by its own `reset_parameters`, so that ZeRO-3's
    `zero.Init`, which partitions each module when its constructor returns, keeps this initialisation."""

    def __init__(self, d_in: int, d_out: int, std: float = 0.02, bias: bool = True) -> None:
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(d_in, d_out, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        # fp16 autocast (App. D.2): the matmul in fp16, the fp32 bias added in fp32 and its gradient summed in fp32
        # (F.linear would round the bias to fp16 and sum its gradient in fp16)
        return _AddBiasFP32.apply(F.linear(x, self.weight), self.bias)


class _AddBiasFP32(torch.autograd.Function):
    """y (..., d) low precision + b (d,) fp32 -> y's dtype, added in fp32; db = sum of dy in fp32."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (y.float() + b.float()).to(y.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return g, g.float().sum(dim=tuple(range(g.dim() - 1)))


class Embedding(nn.Embedding):
    """nn.Embedding initialised N(0, std) by its own `reset_parameters` (see `Linear`)."""

    def __init__(self, n: int, d: int, std: float = 0.02) -> None:
        self.std = std
        super().__init__(n, d)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
