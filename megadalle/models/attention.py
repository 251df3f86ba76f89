"""Masked attention for the prior: one registry of implementations, each an nn.Module built from its layer's
`MaskSpec` (models/sparsity.py). q, k, v (B, nh, N, hd) -> (B, nh, N, hd); every implementation is
interchangeable with `DenseAttention`, the reference.

    dense    masked SDPA over the (N, N) mask (a buffer of the module: it moves with `.to()`)
    flex     FlexAttention with a BlockMask of our block layout (its backward needs a GPU)
    blocked  the block layout in plain PyTorch (models/blocked_attention.py): CPU, portable fallback
    triton   the Triton block-sparse kernels (kernels/block_sparse_attention.py): GPU, or TRITON_INTERPRET=1
    auto     triton on a GPU; on the CPU blocked where measured faster than dense, else dense

    make_attention(name, spec) -> nn.Module

Incremental decoding (`decode_attention`) reads only the keys a query may see: the text and the layer's image
window (views of the KV cache).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megadalle.models.blocked_attention import BlockedPlan, blocked_attention, faster_than_dense
from megadalle.models.sparsity import EMPTY, FULL, MaskSpec


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(hd) masked) v, one normalisation over every attended key."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class DenseAttention(nn.Module):
    """Masked SDPA over the whole (N, N) mask: the reference every other implementation is tested against."""

    def __init__(self, spec: MaskSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("mask", spec.dense(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[2]
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # the CPU's SDPA kernel is 2.2x slower in bf16 than in fp32 (forward + backward at the demo prior's
            # 16 x 4 heads x 96 positions, 13.4 against 6.1 ms a layer): fp32 inside, even under train.autocast
            with torch.autocast("cpu", enabled=False):
                return dense_attention(q.float(), k.float(), v.float(), self.mask[:n, :n]).to(q.dtype)
        return dense_attention(q, k, v, self.mask[:n, :n])


def block_mask_from_spec(spec: MaskSpec, device: torch.device | str, block: int = 128) -> Any:
    """A FlexAttention BlockMask whose block structure is our `block_layout`: FULL blocks skip the mask_mod,
    PARTIAL blocks evaluate it, EMPTY blocks are never visited. The mask_mod is the mask's definition
    (`MaskSpec.allowed`), arithmetic on the indices, so no N x N tensor is read (as in the Triton kernel)."""
    from torch.nn.attention.flex_attention import BlockMask

    n = spec.n
    layout = spec.layout(block).to(device)  # (nb, nb)
    nb = layout.shape[0]

    def indices(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = select.sum(dim=1).to(torch.int32)  # (nb,)
        order = torch.argsort((~select).to(torch.int8), dim=1, stable=True).to(torch.int32)  # selected first
        return counts.view(1, 1, nb), order.view(1, 1, nb, nb)

    partial = (layout != EMPTY) & (layout != FULL)
    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(layout == FULL)

    def mask_mod(b, h, q_idx, kv_idx):
        return spec.allowed(q_idx, kv_idx)

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(n, n))  # fmt: skip


class FlexAttention(nn.Module):
    """FlexAttention driven by a BlockMask built once from this layer's mask (our block layout). The BlockMask
    is rebuilt from the mask whenever the module moves (`_apply`), so it always lives on the mask's device.
    Full-length streams only: the BlockMask is stated for N x N."""

    def __init__(self, spec: MaskSpec, block: int = 128) -> None:
        super().__init__()
        self.spec, self.block = spec, block
        self.register_buffer("mask", spec.dense(), persistent=False)  # where the BlockMask lives (it follows it)
        self.block_mask = self._build()

    def _build(self) -> Any:
        if self.mask.device.type == "meta":
            return None  # nothing to attend with on the meta device; rebuilt when moved to a real one
        return block_mask_from_spec(self.spec, self.mask.device, self.block)

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


class BlockedAttention(nn.Module):
    """The block layout executed in PyTorch (`blocked_attention`); the band's bias is a buffer."""

    def __init__(self, spec: MaskSpec, block: int = 32, plan: BlockedPlan | None = None) -> None:
        super().__init__()
        self.spec, self.plan = spec, plan or BlockedPlan(spec, block)
        self.register_buffer("bias", self.plan.bias, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return blocked_attention(q, k, v, self.plan, self.bias)


def triton_usable(device: torch.device) -> bool:
    """Triton runs the kernels on a CUDA device, or anywhere under the interpreter (TRITON_INTERPRET=1)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class TritonAttention(nn.Module):
    """The Triton block-sparse kernels; `block` None picks the kernel's default for the device. The module owns
    its lookup tables, one per device, built on first use there."""

    def __init__(self, spec: MaskSpec, block: int | None = None) -> None:
        super().__init__()
        self.spec, self.block = spec, block
        self.tables: dict[str, Any] = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not triton_usable(q.device):
            raise RuntimeError(
                f"model.attention = 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); q is on {q.device}"
            )
        from kernels.block_sparse_attention import block_sparse_attention, block_table, default_block

        key = str(q.device)
        if key not in self.tables:
            self.tables[key] = block_table(self.spec, self.block or default_block(q.device), q.device)
        return block_sparse_attention(q, k, v, self.spec, None, self.tables[key])


class AutoAttention(nn.Module):
    """Triton on a GPU; on the CPU `blocked` where `faster_than_dense` (measured) says so, else dense SDPA.
    Decided per call from the device, so a model built on the CPU and moved to a GPU switches to the kernel."""

    def __init__(self, spec: MaskSpec) -> None:
        super().__init__()
        self.spec = spec
        plan = BlockedPlan(spec)
        self.on_cpu = BlockedAttention(spec, plan=plan) if faster_than_dense(plan) else DenseAttention(spec)
        self.on_gpu = TritonAttention(spec)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.is_cuda and triton_usable(q.device):
            return self.on_gpu(q, k, v)
        return self.on_cpu(q, k, v)


ATTENTION: dict[str, type[nn.Module]] = {
    "dense": DenseAttention,
    "flex": FlexAttention,
    "blocked": BlockedAttention,
    "triton": TritonAttention,
    "auto": AutoAttention,
}
"""model.attention -> implementation."""


def make_attention(name: str, spec: MaskSpec) -> nn.Module:
    """The attention module `name` for the layer whose mask is `spec`."""
    if name not in ATTENTION:
        raise ValueError(f"attention {name!r} is not implemented (known: {sorted(ATTENTION)})")
    return ATTENTION[name](spec)


def dense_mask(spec: MaskSpec, device: str) -> torch.Tensor:
    """spec.dense() on `device`."""
    return spec.dense().to(device)


@dataclass(frozen=True)
class DecodeWindow:
    """Where each image query of a raster-order mask finds its image keys: image indices lo[i], lo[i] + step, ...,
    i (a contiguous band for row and conv, every W-th position for column), plus all T text keys. bias (HW, K)
    is 0 where the window's entry is allowed and -inf where not (conv's window spans whole rows), None when every
    entry of every window is allowed. Python ints for lo and width, so a decoding step never syncs the device."""

    lo: list[int]
    width: list[int]
    step: int
    bias: torch.Tensor | None


def decode_window(spec: MaskSpec, device: str) -> DecodeWindow:
    """The windows of `spec` (raster order) on `device` (the attention layer owns and reuses them)."""
    if spec.kind == "column" and spec.transposed:
        raise ValueError("decoding runs in raster order: use the column mask with transposed=False")
    t, hw = spec.text_len, spec.height * spec.width
    dense = spec.dense()  # (N, N), built once here
    image = dense[t:, t:]  # (HW, HW)
    if not bool(dense[t:, :t].all()):
        raise ValueError(f"{spec}: image queries must see every text key")
    step = spec.width if spec.kind == "column" else 1
    lo = [int(row.nonzero()[0]) for row in image]  # the earliest allowed image key (the query itself at least)
    width = [(i - lo[i]) // step + 1 for i in range(hw)]
    bias = torch.full((hw, max(width)), float("-inf"))
    for i in range(hw):
        window = torch.arange(lo[i], i + 1, step)
        if int(image[i].sum()) != int(image[i, window].sum()):
            raise ValueError(f"{spec}: image query {i} has allowed keys outside its decode window")
        bias[i, : width[i]] = torch.where(image[i, window], 0.0, float("-inf"))
    exact = all(bool((bias[i, : width[i]] == 0).all()) for i in range(hw))
    return DecodeWindow(lo, width, step, None if exact else bias.to(device))


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: int,
    spec: MaskSpec,
    window: DecodeWindow | None = None,
) -> torch.Tensor:
    """One image query at stream `position` (>= T) against the KV cache: q (B, nh, 1, hd), keys/values
    (B, nh, >= position + 1, hd) -> (B, nh, 1, hd). Reads the T text keys and the query's image window (views
    of the cache, no gather): W + 1 image keys for a row layer, H for a column layer."""
    t = spec.text_len
    if not t <= position < spec.n:
        raise ValueError(f"decode_attention takes an image position in [{t}, {spec.n}), got {position}")
    win = decode_window(spec, str(q.device)) if window is None else window
    i = position - t
    lo, n = win.lo[i], win.width[i]
    k_img = keys[:, :, t + lo : position + 1 : win.step]  # (B, nh, n, hd)
    v_img = values[:, :, t + lo : position + 1 : win.step]
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_img = (q @ k_img.transpose(-1, -2)) * scale  # (B, nh, 1, n)
    if win.bias is not None:
        s_img = s_img + win.bias[i, :n].to(s_img.dtype)
    if not t:
        return s_img.softmax(dim=-1) @ v_img
    s_txt = (q @ keys[:, :, :t].transpose(-1, -2)) * scale  # (B, nh, 1, T)
    p = torch.cat([s_txt, s_img], dim=-1).softmax(dim=-1)  # (B, nh, 1, T + n)
    return p[..., :t] @ values[:, :, :t] + p[..., t:] @ v_img


def decode_ring(spec: MaskSpec) -> int | None:
    """Image slots of a ring KV cache for the raster-order `spec`: row W + 1 (its window exactly), conv
    (kernel // 2 + 1) W (the rows its window spans); None (a full cache) for column and causal, or when the ring
    would not be shorter than the image."""
    if spec.kind == "row":
        ring = spec.width + 1
    elif spec.kind == "conv":
        ring = (spec.kernel // 2 + 1) * spec.width
    else:
        return None
    return ring if ring < spec.height * spec.width else None


def ring_decode_table(spec: MaskSpec, device: str) -> torch.Tensor | None:
    """(HW, T + ring) bool: which slots of the ring cache image query i may attend once it has written its own
    key (slot T + j holds image position i - ((i - j) mod ring)); None when every filled slot is allowed (row).
    Checks that every allowed key of the mask is in the ring. The attention layer owns and reuses it."""
    ring = decode_ring(spec)
    if ring is None:
        raise ValueError(f"{spec} decodes with a full cache, not a ring")
    t, hw = spec.text_len, spec.height * spec.width
    i = torch.arange(hw)[:, None]
    j = torch.arange(ring)[None, :]
    p = i - (i - j) % ring  # (HW, ring) image position held by slot j
    filled = p >= 0
    image = filled & spec.allowed(t + i, t + p.clamp(min=0))
    if int(image.sum()) != int(spec.dense()[t:, t:].sum()):
        raise ValueError(f"{spec}: the ring of {ring} slots misses allowed keys")
    if bool((image == filled).all()):
        return None
    return torch.cat([torch.ones(hw, t, dtype=torch.bool), image], dim=1).to(device)
