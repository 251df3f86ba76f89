"""Masked attention: the dense SDPA reference and FlexAttention driven by our block layouts.

q, k, v (B, nh, N, hd); mask (N, N) bool, True = attend. Both return (B, nh, N, hd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megadalle.models.sparsity import EMPTY, FULL, block_layout


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(hd) masked) v, one normalisation over every attended key."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def block_mask_from_layout(mask: torch.Tensor, block: int = 128):
    """A FlexAttention BlockMask whose block structure is our `block_layout`: FULL blocks skip the mask_mod,
    PARTIAL blocks evaluate it, EMPTY blocks are never visited."""
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
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:n, :n] = mask

    def mask_mod(b, h, q_idx, kv_idx):
        return padded[q_idx, kv_idx]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(n, n))  # fmt: skip


_BLOCK_MASKS: dict[tuple[int, int, str], object] = {}


def flex_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    key = (mask.data_ptr(), mask.shape[0], str(q.device))
    if key not in _BLOCK_MASKS:
        _BLOCK_MASKS[key] = block_mask_from_layout(mask.cpu()).to(q.device)
    return flex_attention(q, k, v, block_mask=_BLOCK_MASKS[key])
