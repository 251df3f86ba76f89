"""A contrastive image-text model (CLIP-style) trained here on our shards: the reranker of Sec. 2.6.

images (B, 3, S, S) in [0, 1] and BPE ids (B, T) (PAD_ID = no text) -> unit embeddings (B, E) each;
loss: symmetric InfoNCE over the batch with a learned temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megadalle.models.layers import Embedding
from megadalle.models.tokenizer import PAD_ID


@dataclass(frozen=True)
class ClipArgs:
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128, 256)
    """Widths of the image tower's stages; each stage halves the resolution."""
    text_len: int = 32
    text_vocab: int = 2048
    width: int = 256
    """Width of the text transformer."""
    layers: int = 4
    heads: int = 4
    embed_dim: int = 256


FLAVORS: dict[str, ClipArgs] = {
    "debug": ClipArgs(
        image_size=32, channels=(16, 32, 64), text_len=16, text_vocab=512, width=64, layers=2, heads=2, embed_dim=64
    ),  # fmt: skip
    "small": ClipArgs(),
}


class ConvStage(nn.Module):
    """GroupNorm-GELU-conv3x3 (stride 2) then a residual GroupNorm-GELU-conv3x3."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm_1 = nn.GroupNorm(min(8, c_in), c_in)
        self.down = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.norm_2 = nn.GroupNorm(8, c_out)
        self.conv = nn.Conv2d(c_out, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(F.gelu(self.norm_1(x)))
        return x + self.conv(F.gelu(self.norm_2(x)))


class ImageTower(nn.Module):
    def __init__(self, a: ClipArgs) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, a.channels[0], 3, padding=1)
        widths = [a.channels[0], *a.channels]
        self.stages = nn.Sequential(*[ConvStage(widths[i], widths[i + 1]) for i in range(len(a.channels))])
        self.norm = nn.GroupNorm(8, a.channels[-1])
        self.proj = nn.Linear(a.channels[-1], a.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images * 2 - 1))  # (B, C, s, s)
        x = F.gelu(self.norm(x)).mean(dim=(2, 3))  # (B, C)
        return self.proj(x)


class TextBlock(nn.Module):
    """Pre-LN bidirectional self-attention and MLP over the real tokens (padding keys masked)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, h, T, hd)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class TextTower(nn.Module):
    def __init__(self, a: ClipArgs) -> None:
        super().__init__()
        self.tok = Embedding(a.text_vocab, a.width, std=0.02)
        self.pos = Embedding(a.text_len, a.width, std=0.01)
        self.blocks = nn.ModuleList([TextBlock(a.width, a.heads) for _ in range(a.layers)])
        self.ln = nn.LayerNorm(a.width)
        self.proj = nn.Linear(a.width, a.embed_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        keep = text != PAD_ID  # (B, T)
        keep[:, 0] = True  # an empty caption still has one position to pool
        x = self.tok(text) + self.pos(torch.arange(text.shape[1], device=text.device))
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln(x)
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)  # mean over real tokens (B, D)
        return self.proj(pooled)


class ClipOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 finds the tensors of a module's output only in tuples, lists and
    dicts, and without them skips the hooks that give the root module's own parameters their gradients."""

    loss: torch.Tensor
    logits: torch.Tensor
    """(B, B) image-by-text similarities times the learned scale."""
    image_emb: torch.Tensor
    text_emb: torch.Tensor
    scale: torch.Tensor
    """The learned temperature's inverse (exp of logit_scale, clamped at 100)."""


class ContrastiveModel(nn.Module):
    def __init__(self, a: ClipArgs) -> None:
        super().__init__()
        self.a = a
        self.image = ImageTower(a)
        self.text = TextTower(a)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # (1,): DeepSpeed flattens no 0-d

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, self.a.image_size, self.a.image_size):
            raise ValueError(f"images of shape {tuple(images.shape)}, expected (B, 3, {self.a.image_size}, ...)")
        dtype = self.image.stem.weight.dtype  # images arrive in fp32; the tower may run in bf16
        return F.normalize(self.image(images.to(dtype)).float(), dim=-1)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        if text.dim() != 2 or text.shape[1] != self.a.text_len:
            raise ValueError(f"text of shape {tuple(text.shape)}, expected (B, {self.a.text_len})")
        return F.normalize(self.text(text).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.float().clamp(max=math.log(100)).exp().squeeze(0)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> ClipOutput:
        img, txt = self.embed_images(images), self.embed_text(text)
        scale = self.scale()
        with torch.autocast(img.device.type, enabled=False):  # fp32: bf16 would round the similarities at scale 100
            logits = scale * img @ txt.T  # (B, B)
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return ClipOutput(loss, logits, img, txt, scale)

    @torch.no_grad()
    def score(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity x 100 of each image with its own caption: (B,) (the reranking score)."""
        return 100 * (self.embed_images(images) * self.embed_text(text)).sum(-1)


def recall_at_k(sim: torch.Tensor, k: int) -> float:
    """sim (N, N), row i's match is column i: the share of rows whose match is among the top k."""
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return float((topk == torch.arange(len(sim))[:, None]).any(1).float().mean())
