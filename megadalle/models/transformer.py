"""The DALL-E prior: a decoder-only sparse transformer over text then image tokens (Sec. 2.2, App. B).

Stream (B, N), N = T + H W: T text positions (BPE ids; positions without text get a learned padding token
of their own, id text_vocab + position) then the H x W image codes in raster order. Logits at position t
predict token t + 1: text logits over the text vocabulary, image logits over the image vocabulary, in fp32.
Loss = 1/8 text CE + 7/8 image CE, each averaged over its own target tokens (text targets: real text tokens).

Each layer is two resblocks (pre-LN attention, pre-LN MLP), the unit the per-resblock gradient scaler wraps.
Column layers transpose the image states (rows <-> columns) before attention and back after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megadalle.models.attention import (
    decode_attention,
    decode_ring,
    decode_window,
    dense_attention,
    dense_mask,
    make_attention,
    ring_decode_table,
)
from megadalle.models.layers import Embedding, Linear
from megadalle.models.sparsity import Kind, MaskSpec, image_transpose_perm, layer_kinds

PAD_ID = 0  # the tokenizer's <pad>: "no text here"

BlockRunner = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def call_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain way to run a resblock; wrappers in engine/wrap.py compose around it."""
    return block(x)


Residual = Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def plain_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x + f(x): how a resblock joins its branch to the identity path, unless engine/grad_scaler.py replaces it
    (the block's `residual` attribute; the block is still called through its `__call__`)."""
    return x + branch(x)


@dataclass(frozen=True)
class PriorArgs:
    n_layers: int = 64
    d_model: int = 3968
    n_heads: int = 62
    text_len: int = 256
    text_vocab: int = 16384
    grid: int = 32
    """Image tokens form a grid x grid raster (the dVAE's code grid)."""
    image_vocab: int = 8192
    mlp_ratio: int = 4
    conv_kernel: int = 11
    text_loss_weight: float = 1 / 8
    """Image loss weight is 1 - this."""

    @property
    def seq_len(self) -> int:
        return self.text_len + self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


FLAVORS: dict[str, PriorArgs] = {
    "debug": PriorArgs(n_layers=4, d_model=64, n_heads=4, text_len=16, text_vocab=512, grid=8, image_vocab=256),
    "small": PriorArgs(n_layers=8, d_model=256, n_heads=4, text_len=32, text_vocab=2048, grid=8, image_vocab=1024),
    # the debug sequence at 60M parameters: memory measured where 1 / world size shows
    # (tests/engine/test_checkpoint_memory.py)
    "debug60m": PriorArgs(n_layers=12, d_model=640, n_heads=10, text_len=16, text_vocab=512, grid=8, image_vocab=256),
    "1p3b": PriorArgs(n_layers=24, d_model=2048, n_heads=32),
    "12b": PriorArgs(),
}


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 with fp32 gain and bias, whatever the activations' dtype; the output in the
    input's dtype, or in autocast's (fp16 under per-resblock scaling)."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        device = x.device.type  # under fp16 autocast, the branch's fp16 input (the next matmul would cast it anyway)
        return y.to(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype)


class FP32Head(Linear):
    """Unembedding computed in fp32 whatever the parameters' and activations' dtype (logits stay fp32).
    Called as a module so that ZeRO-3 gathers its weight."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out, std=0.02, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # fp16 autocast (per-resblock scaling) would cast it
            return F.linear(x.float(), self.weight.float())


class AttentionBlock(nn.Module):
    """x + attn(LN(x)) with the layer's mask. `attention` names the implementation in models/attention.py's
    registry; the implementation module owns this layer's mask. Column layers transpose the image states."""

    def __init__(self, a: PriorArgs, kind: Kind, attention: str) -> None:
        super().__init__()
        if a.d_model % a.n_heads:
            raise ValueError(f"d_model {a.d_model} is not divisible by n_heads {a.n_heads}")
        self.a, self.kind = a, kind
        self.ln = LayerNorm(a.d_model)
        self.qkv = Linear(a.d_model, 3 * a.d_model, std=0.02)
        self.proj = Linear(a.d_model, a.d_model, std=0.02 / math.sqrt(2 * a.n_layers))
        self.residual: Residual = plain_residual
        self.attend = make_attention(attention, MaskSpec(kind, a.text_len, a.grid, a.grid, a.conv_kernel))
        # incremental decoding runs in raster order: the column relation untransposed (attention is
        # permutation-equivariant); the other kinds are stated in raster order already
        self.raster = MaskSpec(kind, a.text_len, a.grid, a.grid, a.conv_kernel, transposed=False)
        self.sparse_decode = True
        """One image position at a time reads only its allowed keys; False attends the whole prefix with the dense
        mask (the benchmark's baseline, tools/bench_sampling.py)."""
        self.decode_tables: dict[tuple[str, str], Any] = {}
        """The raster mask's decoding tables, built on first use per device and owned by this layer."""
        if kind == "column":
            perm = image_transpose_perm(a.grid, a.grid)
            self.register_buffer("perm", perm, persistent=False)
            self.register_buffer("inv_perm", torch.argsort(perm), persistent=False)

    def _transpose(self, x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        t = self.a.text_len
        return torch.cat([x[:, :t], x[:, t:][:, perm]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.branch)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) of the resblock x + f(x): (B, N, D) -> (B, N, D), the part the gradient scaler wraps."""
        B, N, D = x.shape
        h = self.ln(x)
        if self.kind == "column":
            h = self._transpose(h, self.perm)  # image part column by column
        q, k, v = self.qkv(h).split(D, dim=2)
        nh, hd = self.a.n_heads, self.a.head_dim
        q = q.view(B, N, nh, hd).transpose(1, 2)  # (B, nh, N, hd)
        k = k.view(B, N, nh, hd).transpose(1, 2)  # (B, nh, N, hd)
        v = v.view(B, N, nh, hd).transpose(1, 2)  # (B, nh, N, hd)
        y = self.attend(q, k, v)  # (B, nh, N, hd)
        y = y.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        if self.kind == "column":
            y = self._transpose(y, self.inv_perm)  # back to raster order
        return self.proj(y)

    def _decode_table(self, name: str, device: torch.device) -> Any:
        key = (name, str(device))
        if key not in self.decode_tables:
            build = {"dense": dense_mask, "window": decode_window, "ring": ring_decode_table}[name]
            self.decode_tables[key] = build(self.raster, str(device))
        return self.decode_tables[key]

    @property
    def ring(self) -> int | None:
        """Slots of this layer's image ring cache (`ring_decode_table`), None for a full cache."""
        return decode_ring(self.raster) if self.sparse_decode else None

    def forward_cached(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], start: int) -> torch.Tensor:
        """Incremental attention for stream positions start..start+n-1 in raster order; column layers use the
        raster-order form of their mask instead of transposing the states. cache: K, V buffers (B, nh, S, hd).
        Full caches (S = N, column layers) hold every position; one image position at a time then reads the text
        and its image window (`decode_attention`). Ring caches (S = T + ring, row and conv layers) hold the text
        and the last `ring` image positions, image position p in slot T + p % ring: one SDPA call over the ring
        reads exactly the row layer's W + 1 image keys plus the text (conv: a mask over its ring). A prompt
        (from position 0) attends itself with the dense mask."""
        B, n, D = x.shape
        nh, hd, t = self.a.n_heads, self.a.head_dim, self.a.text_len
        q, k, v = self.qkv(self.ln(x)).split(D, dim=2)
        q = q.view(B, n, nh, hd).transpose(1, 2)  # (B, nh, n, hd)
        k = k.view(B, n, nh, hd).transpose(1, 2)  # (B, nh, n, hd)
        v = v.view(B, n, nh, hd).transpose(1, 2)  # (B, nh, n, hd)
        ring = cache[0].shape[2] - t if cache[0].shape[2] < self.a.seq_len else None
        if ring is None:
            cache[0][:, :, start : start + n], cache[1][:, :, start : start + n] = k, v
            if n == 1 and start >= t and self.sparse_decode:
                y = decode_attention(q, cache[0], cache[1], start, self.raster, self._decode_table("window", x.device))
            else:
                keys, values = cache[0][:, :, : start + n], cache[1][:, :, : start + n]  # (B, nh, start + n, hd)
                y = dense_attention(
                    q, keys, values, self._decode_table("dense", x.device)[start : start + n, : start + n]
                )
        elif start == 0:  # the prompt: text and a possible image prefix attend each other
            if n < t:
                raise ValueError(f"a ring cache takes the whole text ({t} positions) as its prompt, got {n}")
            y = dense_attention(q, k, v, self._decode_table("dense", x.device)[:n, :n])  # (B, nh, n, hd)
            cache[0][:, :, :t], cache[1][:, :, :t] = k[:, :, :t], v[:, :, :t]
            kept = torch.arange(max(0, n - t - ring), n - t, device=x.device)  # the last `ring` image positions
            slots = t + kept % ring
            cache[0][:, :, slots], cache[1][:, :, slots] = k[:, :, t + kept], v[:, :, t + kept]
        elif n == 1 and start >= t:
            i = start - t
            slot = t + i % ring
            cache[0][:, :, slot : slot + 1], cache[1][:, :, slot : slot + 1] = k, v
            filled = t + min(i + 1, ring)
            mask = self._decode_table("ring", x.device)
            y = dense_attention(q, cache[0][:, :, :filled], cache[1][:, :, :filled],
                                None if mask is None else mask[i : i + 1, :filled])  # fmt: skip
        else:
            raise ValueError(f"a ring cache takes a prompt from position 0, then one image position at a time "
                             f"(got {n} positions from {start})")  # fmt: skip
        return x + self.proj(y.transpose(1, 2).reshape(B, n, D))


class MLPBlock(nn.Module):
    """x + W2 gelu(W1 LN(x))."""

    def __init__(self, a: PriorArgs) -> None:
        super().__init__()
        self.ln = LayerNorm(a.d_model)
        self.fc = Linear(a.d_model, a.mlp_ratio * a.d_model, std=0.02)
        self.proj = Linear(a.mlp_ratio * a.d_model, a.d_model, std=0.02 / math.sqrt(2 * a.n_layers))
        self.residual: Residual = plain_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.branch)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) of the resblock x + f(x)."""
        return self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh"))


class Layer(nn.Module):
    """One transformer layer: two resblocks, each of the form x + f(x) with f = `block.branch`, run in order by
    `forward`."""

    def __init__(self, a: PriorArgs, kind: Kind, attention: str) -> None:
        super().__init__()
        self.kind = kind
        self.attn = AttentionBlock(a, kind, attention)
        self.mlp = MLPBlock(a)

    def resblocks(self) -> tuple[nn.Module, nn.Module]:
        return self.attn, self.mlp

    def forward(self, x: torch.Tensor, run_block: BlockRunner = call_block) -> torch.Tensor:
        """`run_block(block, x)` calls each resblock: the seam where engine/wrap.py applies activation
        checkpointing (and per-resblock gradient scaling) from outside the model."""
        for block in self.resblocks():
            x = run_block(block, x)
        return x


class PriorOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 finds the tensors of a module's output only in tuples, lists and
    dicts, and without them skips the hooks that give the root module's own parameters their gradients."""

    loss: torch.Tensor
    """1/8 text + 7/8 image cross-entropy, each averaged over this batch's own targets."""
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    text_nll: torch.Tensor
    """Summed cross-entropy over the text targets (real text tokens after the first), for normalising by the
    target count of a larger (global) batch; `text_count` targets."""
    text_count: torch.Tensor
    image_nll: torch.Tensor
    """Summed cross-entropy over the image targets; `image_count` targets."""
    image_count: torch.Tensor
    text_logits: torch.Tensor
    """(B, T, text_vocab) fp32: logits at text positions 0..T-1 (predicting positions 1..T)."""
    image_logits: torch.Tensor
    """(B, H W, image_vocab) fp32: logits predicting image tokens 0..HW-1 (from positions T-1..N-2)."""


class DallePrior(nn.Module):
    def __init__(self, a: PriorArgs, attention: str = "auto", kinds: list[Kind] | None = None) -> None:
        """`attention`: a name in models/attention.py's ATTENTION; `kinds` overrides the paper's layer schedule
        (tests, ablations). Every submodule initialises its own parameters (ZeRO-3's zero.Init keeps them)."""
        super().__init__()
        kinds = kinds or layer_kinds(a.n_layers)
        if len(kinds) != a.n_layers:
            raise ValueError(f"{len(kinds)} layer kinds for {a.n_layers} layers")
        self.a = a
        self.run_block: BlockRunner = call_block
        """How each resblock is called; engine/wrap.py replaces it (activation checkpointing, grad scaling)."""
        self.text_emb = Embedding(a.text_vocab + a.text_len, a.d_model)  # + one padding token per position
        self.text_pos = Embedding(a.text_len, a.d_model)
        self.image_emb = Embedding(a.image_vocab, a.d_model)
        self.row_emb = Embedding(a.grid, a.d_model)
        self.col_emb = Embedding(a.grid, a.d_model)
        self.layers = nn.ModuleList([Layer(a, kind, attention) for kind in kinds])
        self.ln_f = LayerNorm(a.d_model)
        self.text_head = FP32Head(a.d_model, a.text_vocab)
        self.image_head = FP32Head(a.d_model, a.image_vocab)

    def text_ids(self, text: torch.Tensor) -> torch.Tensor:
        """(B, T) tokenizer ids, PAD_ID where there is no text -> embedding ids with per-position padding."""
        pos = torch.arange(self.a.text_len, device=text.device)
        return torch.where(text == PAD_ID, self.a.text_vocab + pos, text)

    def embed(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text (B, T), image (B, n) with n <= H W raster codes -> (B, T + n, D)."""
        a = self.a
        n = image.shape[1]
        pos = torch.arange(n, device=image.device)
        x_img = self.image_emb(image) + self.row_emb(pos // a.grid) + self.col_emb(pos % a.grid)  # (B, n, D)
        x_txt = self.text_emb(self.text_ids(text)) + self.text_pos(torch.arange(a.text_len, device=text.device))
        return torch.cat([x_txt, x_img], dim=1)

    def check_inputs(self, text: torch.Tensor, image: torch.Tensor) -> None:
        """Shapes only, so no host synchronisation in training (value ranges: `check_token_ranges`, on the data
        path)."""
        a = self.a
        if text.dim() != 2 or text.shape[1] != a.text_len:
            raise ValueError(f"text has shape {tuple(text.shape)} but the model takes (B, {a.text_len})")
        if image.dim() != 2 or image.shape[1] != a.grid * a.grid:
            raise ValueError(f"image has shape {tuple(image.shape)} but the model takes (B, {a.grid * a.grid})")

    def hidden(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(text, image)
        for layer in self.layers:
            x = layer(x, self.run_block)
        return self.ln_f(x)

    def new_cache(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Empty K, V buffers (B, nh, S, hd) for every layer, for incremental decoding: S = N (a full cache), or
        T + ring for a layer whose image keys fit a ring (row: W + 1 slots, conv: (kernel // 2 + 1) W)."""
        a = self.a
        like = self.text_head.weight
        caches = []
        for layer in self.layers:
            ring = layer.attn.ring
            shape = (batch, a.n_heads, a.seq_len if ring is None else a.text_len + ring, a.head_dim)
            caches.append((like.new_zeros(shape), like.new_zeros(shape)))
        return caches

    def forward_cached(self, x: torch.Tensor, cache: list, start: int) -> torch.Tensor:
        """Embedded stream positions start..start+n-1 (B, n, D) -> final hidden states (B, n, D), filling the cache."""
        for layer, layer_cache in zip(self.layers, cache):
            x = layer.attn.forward_cached(x, layer_cache, start)
            x = layer.mlp(x)
        return self.ln_f(x)

    def embed_image_token(self, codes: torch.Tensor, p: int) -> torch.Tensor:
        """codes (B,) at raster position p -> (B, 1, D)."""
        pos = torch.tensor([p], device=codes.device)
        row, col = pos // self.a.grid, pos % self.a.grid
        return (self.image_emb(codes) + self.row_emb(row) + self.col_emb(col)).unsqueeze(1)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> PriorOutput:
        """text (B, T) ids (PAD_ID = no text), image (B, H W) codes -> losses and fp32 logits."""
        self.check_inputs(text, image)
        a = self.a
        T = a.text_len
        h = self.hidden(text, image)  # (B, N, D)
        text_logits = self.text_head(h[:, :T])  # (B, T, text_vocab) fp32
        image_logits = self.image_head(h[:, T - 1 : -1])  # (B, HW, image_vocab) fp32
        text_targets = text[:, 1:].masked_fill(text[:, 1:] == PAD_ID, -100)  # padding is not predicted
        text_nll = F.cross_entropy(
            text_logits[:, :-1].reshape(-1, a.text_vocab), text_targets.reshape(-1), ignore_index=-100, reduction="sum"
        )  # 0 when no caption has a second token
        image_nll = F.cross_entropy(image_logits.reshape(-1, a.image_vocab), image.reshape(-1), reduction="sum")
        text_count = (text_targets != -100).sum()
        image_count = torch.tensor(image.numel(), device=image.device)
        text_loss, image_loss = text_nll / text_count.clamp(min=1), image_nll / image_count
        loss = a.text_loss_weight * text_loss + (1 - a.text_loss_weight) * image_loss
        return PriorOutput(
            loss, text_loss, image_loss, text_nll, text_count, image_nll, image_count, text_logits, image_logits
        )


def check_token_ranges(a: PriorArgs, text: torch.Tensor, image: torch.Tensor) -> None:
    """Token ids within the vocabularies. Reads the values (a host sync on an accelerator): call it where the batch
    is still on the CPU (the data path), not in the model's forward."""
    if int(text.max()) >= a.text_vocab or int(text.min()) < 0:
        raise ValueError(f"text ids must be in [0, {a.text_vocab}), got [{int(text.min())}, {int(text.max())}]")
    if int(image.max()) >= a.image_vocab or int(image.min()) < 0:
        raise ValueError(f"image codes must be in [0, {a.image_vocab}), got [{int(image.min())}, {int(image.max())}]")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_sample(a: PriorArgs, attended_pairs: list[int]) -> float:
    """Forward + backward FLOPs of one sample: 6 x (matmul parameters) per token plus attention,
    counting only attended pairs (QK^T and PV: 2 x 2 x d per pair, x 3 for backward)."""
    n, d = a.seq_len, a.d_model
    per_layer = 12 * d * d
    heads = d * (a.text_len * a.text_vocab + a.grid * a.grid * a.image_vocab)  # each head on its own positions
    dense = 6 * (n * a.n_layers * per_layer + heads)
    attn = 3 * 4 * d * sum(attended_pairs)
    return float(dense + attn)
