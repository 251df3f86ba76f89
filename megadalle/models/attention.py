"""Masked attention for the prior: one registry of implementations, each an nn.Module that owns its mask.

q, k, v (B, nh, N, hd); the mask (N, N) bool, True = attend, is a registered buffer of the module, so it moves
with `.to()` and belongs to exactly one layer; nothing is cached globally. Every implementation returns
(B, nh, N, hd) and is interchangeable with `DenseAttention`, the reference.

    ATTENTION = {"dense": DenseAttention, "flex": FlexAttention}   # the Triton kernels plug in here
    make_attention(name, mask) -> nn.Module
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megadalle.models.sparsity import EMPTY, FULL, block_layout


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(hd) masked) v, one normalisation over every attended key."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class DenseAttention(nn.Module):
    """Masked SDPA over the whole (N, N) mask: the reference every other implementation is tested against."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[2]
        return dense_attention(q, k, v, self.mask[:n, :n])


def block_mask_from_layout(mask: torch.Tensor, block: int = 128) -> Any:
    """A FlexAttention BlockMask whose block structure is our `block_layout`: FULL blocks skip the mask_mod,
    PARTIAL blocks evaluate it, EMPTY blocks are never visited. Built on the mask's device."""
    from torch.nn.attention.flex_attention import BlockMask

    n = mask.shape[0]
    layout = block_layout(mask, block)  # (nb, nb)
    nb = layout.shape[0]

    def indices(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = select.sum(dim=1).to(torch.int32)  # (nb,)
        order = torch.argsort((~select).to(torch.int8), dim=1, stable=True).to(torch.int32)  # selected first
        return counts.view(1, 1, nb), order.view(1, 1, nb, nb)

    partial = (layout != EMPTY) & (layout != FULL)
    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(layout == FULL)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool, device=mask.device)
    padded[:n, :n] = mask

    def mask_mod(b, h, q_idx, kv_idx):
        return padded[q_idx, kv_idx]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(n, n))  # fmt: skip


class FlexAttention(nn.Module):
    """FlexAttention driven by a BlockMask built once from this layer's mask (our block layout). The BlockMask
    is rebuilt from the mask whenever the module moves (`_apply`), so it always lives on the mask's device.
    Full-length streams only: the BlockMask is stated for N x N."""

    def __init__(self, mask: torch.Tensor, block: int = 128) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("mask", mask, persistent=False)
        self.block_mask = self._build()

    def _build(self) -> Any:
        if self.mask.device.type == "meta":
            return None  # nothing to attend with on the meta device; rebuilt when moved to a real one
        return block_mask_from_layout(self.mask, self.block)

    def _apply(self, fn, recurse: bool = True):
        device = self.mask.device
        super()._apply(fn, recurse)
        if self.mask.device != device or self.block_mask is None:
            self.block_mask = self._build()
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[2]
        if n != self.mask.shape[0]:
            raise ValueError(f"flex attention is built for {self.mask.shape[0]} positions, got {n}")
        return _flex_attention(q.is_cuda)(q, k, v, block_mask=self.block_mask)


@functools.cache
def _flex_attention(compiled: bool) -> Callable[..., torch.Tensor]:
    """FlexAttention, compiled into a fused kernel on a GPU. On the CPU it runs eagerly (the CPU has no backward
    for it, and compiling needs a C++ toolchain per shape), which PyTorch warns about on every call: that one
    warning is silenced here, by its exact message."""
    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        return torch.compile(flex_attention)

    def eager(*args: Any, **kwargs: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="flex_attention called without torch.compile", category=UserWarning
            )
            return flex_attention(*args, **kwargs)

    return eager


ATTENTION: dict[str, type[nn.Module]] = {"dense": DenseAttention, "flex": FlexAttention}
"""model.attention -> implementation. The Triton block-sparse kernels (kernels/) register here."""


def make_attention(name: str, mask: torch.Tensor) -> nn.Module:
    """The attention module `name` owning `mask` (N, N) bool."""
    if name not in ATTENTION:
        raise ValueError(f"attention {name!r} is not implemented (known: {sorted(ATTENTION)})")
    return ATTENTION[name](mask)
