"""The discrete VAE of DALL-E (Sec. 2.1, App. A), with the parameter names of OpenAI's `dall-e` release.

Encoder: image (B, 3, H, W) in the logit-Laplace pixel space -> code logits (B, vocab, H/f, W/f),
f = 2^(group_count - 1) (8 for the paper: 256x256 -> 32x32 of 8192 codes).
Decoder: (relaxed) one-hot codes (B, vocab, h, w) -> (B, 6, h*f, w*f): mu (3) and ln b (3) of the
logit-Laplace distribution of each RGB value.

state_dict keys equal the release's (`blocks.group_2.block_1.res_path.conv_1.w`), so its weights load
into these modules unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megadalle.models.dvae_loss import kl_to_uniform, logit_laplace_log_prob

UPSAMPLING = ("nearest", "subpixel")


@dataclass(frozen=True)
class DVAEArgs:
    image_size: int = 256
    """Side of the square input image."""
    group_count: int = 4
    """Resolution groups; a max-pool (encoder) / x2 upsampling (decoder) between consecutive groups."""
    n_hid: int = 256
    """Width of the first encoder group (and last decoder group); group g has n_hid * 2^g channels."""
    n_blk_per_group: int = 2
    """Bottleneck resblocks per group."""
    vocab_size: int = 8192
    """Codebook size."""
    n_init: int = 128
    """Channels after the decoder's input 1x1 conv."""
    channels: int = 3
    """Image channels."""
    upsample: str = "nearest"
    """Decoder upsampling between groups: "nearest" (the paper's, x2 nearest-neighbour) or "subpixel" (a 1x1 conv
    to 4x the next group's width, then a pixel shuffle; Shi et al. 2016). Subpixel lets the decoder place detail
    inside a code's cell from that code alone; the demo's 3-group decoder needs it (configs/dvae_small.toml)."""

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {self.upsample!r}")

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid (32 for the paper)."""
        return self.image_size // self.downsample


FLAVORS: dict[str, DVAEArgs] = {
    "paper": DVAEArgs(),
    # CPU demo: 32 px -> 8x8 codes of 1024 (configs/dvae_small.toml says why 32 px and subpixel upsampling)
    "small": DVAEArgs(
        image_size=32, group_count=3, n_hid=64, n_blk_per_group=1, vocab_size=1024, n_init=64, upsample="subpixel"
    ),
    # tests: 32 px -> 8x8 codes of 256
    "debug": DVAEArgs(image_size=32, group_count=3, n_hid=32, n_blk_per_group=1, vocab_size=256, n_init=32),
}


class Conv2d(nn.Module):
    """Same-padded convolution with the release's parameter names `w` (out, in, k, k) and `b` (out,)."""

    def __init__(self, n_in: int, n_out: int, kw: int, fp32: bool = False) -> None:
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.fp32 = fp32
        """Computed in fp32 under autocast (train.autocast): the encoder's code logits (divided by tau down to 1/16
        in the gumbel softmax) and the decoder's mu and ln b (the likelihood divides by b) are kept out of bf16."""
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.empty(n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w, std=1 / math.sqrt(self.n_in * self.kw**2))
        nn.init.zeros_(self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=(self.kw - 1) // 2)
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kw - 1) // 2)


class ResBlock(nn.Module):
    """id_path(x) + post_gain * res_path(x); res_path is relu-conv four times at hidden width n_out/4."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        if n_out % 4:
            raise ValueError(f"resblock width must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2  # small residual branch at init (the release's choice)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class SubpixelUpsample(nn.Module):
    """x2 upsampling by a learned 1x1 conv to 4 * n_out channels and a pixel shuffle: (B, n_in, h, w) ->
    (B, n_out, 2h, 2w); each of the four output pixels of a cell gets its own weights."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = Conv2d(n_in, 4 * n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


def _group(blocks: list[ResBlock], resize: tuple[str, nn.Module] | None) -> nn.Sequential:
    items: list[tuple[str, nn.Module]] = [(f"block_{i + 1}", b) for i, b in enumerate(blocks)]
    return nn.Sequential(OrderedDict(items + ([resize] if resize else [])))


class Encoder(nn.Module):
    def __init__(self, args: DVAEArgs) -> None:
        super().__init__()
        self.args = args
        G, B, h = args.group_count, args.n_blk_per_group, args.n_hid
        n_layers = G * B
        layers: list[tuple[str, nn.Module]] = [("input", Conv2d(args.channels, h, 7))]
        n_in = h
        for g in range(G):
            n_out = h * 2**g
            blocks = [ResBlock(n_in if i == 0 else n_out, n_out, n_layers, (3, 3, 3, 1)) for i in range(B)]
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if g < G - 1 else None
            layers.append((f"group_{g + 1}", _group(blocks, pool)))
            n_in = n_out
        layers.append(
            (
                "output",
                nn.Sequential(
                    OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(n_in, args.vocab_size, 1, fp32=True))])
                ),
            )  # fmt: skip
        )
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) mapped pixels -> logits (B, vocab, H/f, W/f)."""
        a = self.args
        if x.dim() != 4:
            raise ValueError(f"input shape {tuple(x.shape)} is not 4d")
        if x.shape[1] != a.channels:
            raise ValueError(f"input has {x.shape[1]} channels but model built for {a.channels}")
        if x.shape[2] % a.downsample or x.shape[3] % a.downsample:
            raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by the downsampling {a.downsample}")
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, args: DVAEArgs) -> None:
        super().__init__()
        self.args = args
        G, B, h = args.group_count, args.n_blk_per_group, args.n_hid
        n_layers = G * B
        layers: list[tuple[str, nn.Module]] = [("input", Conv2d(args.vocab_size, args.n_init, 1))]
        n_in = args.n_init
        for g in range(G):
            n_out = h * 2 ** (G - 1 - g)
            blocks = [ResBlock(n_in if i == 0 else n_out, n_out, n_layers, (1, 3, 3, 3)) for i in range(B)]
            up: tuple[str, nn.Module] | None = None
            n_in = n_out
            if g < G - 1 and args.upsample == "nearest":
                up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))
            elif g < G - 1:  # straight to the next group's width: its first block needs no 1x1 skip conv
                n_in = n_out // 2
                up = ("upsample", SubpixelUpsample(n_out, n_in))
            layers.append((f"group_{g + 1}", _group(blocks, up)))
        out_conv = Conv2d(n_in, 2 * args.channels, 1, fp32=True)
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", out_conv)]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, vocab, h, w) relaxed or hard one-hot codes -> (B, 2C, h*f, w*f) = mu, ln b."""
        if z.dim() != 4:
            raise ValueError(f"input shape {tuple(z.shape)} is not 4d")
        if z.shape[1] != self.args.vocab_size:
            raise ValueError(f"input has {z.shape[1]} channels but model built for {self.args.vocab_size}")
        return self.blocks(z)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int64 -> (B, 2C, H, W); the one-hot input conv is an embedding lookup."""
        onehot = F.one_hot(codes, self.args.vocab_size).permute(0, 3, 1, 2)  # (B, vocab, h, w)
        return self(onehot.to(self.blocks.input.w.dtype))


def gumbel_softmax(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Relaxed one-hot sample over dim 1 in fp32: softmax((logits + g) / tau), g ~ Gumbel(0, 1).
    (-log(-log u) from uniform draws: several times faster on CPU than F.gumbel_softmax's exponential_.)"""
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-12, 1 - 1e-7)
    g = -torch.log(-torch.log(u))
    return F.softmax((logits.float() + g) / tau, dim=1)


class DVAEOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 finds the tensors of a module's output only in tuples, lists and
    dicts, and without them skips the hooks that give the root module's own parameters their gradients."""

    loss: torch.Tensor
    """Scalar to minimise: (-recon + beta * KL) / (H W C), averaged over the batch."""
    recon: torch.Tensor
    """Mean reconstruction log-likelihood per image (nats)."""
    kl: torch.Tensor
    """Mean KL(q || uniform) per image (nats)."""
    logits: torch.Tensor
    """Encoder logits (B, vocab, h, w)."""
    decoded: torch.Tensor
    """Decoder output (B, 2C, H, W): mu, ln b."""


class DiscreteVAE(nn.Module):
    """Encoder + decoder under the names `encoder.*` / `decoder.*`; forward returns the training objective."""

    def __init__(self, args: DVAEArgs) -> None:
        super().__init__()
        self.args = args
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)

    def forward(
        self, x: torch.Tensor, tau: float, beta: float, hard: bool = False, target_codes: torch.Tensor | None = None
    ) -> DVAEOutput:
        """x: mapped pixels (B, C, H, W), fp32. Relaxed codes (gumbel-softmax at temperature tau), or with `hard`
        one-hot codes sampled from q, which makes -loss at beta=1 an estimate of the true ELB. The encoder gets x
        in its parameters' dtype; the likelihood's target stays x as given (bf16 would merge 25 of the 256 pixel
        levels).

        With `target_codes` (B, h, w), the warm start (not in the paper; stages/dvae.py): the decoder gets those
        codes one-hot, and the cross-entropy of q against them replaces beta * KL in the loss (KL still reported)."""
        logits = self.encoder(x.to(self.encoder.blocks.input.w.dtype))  # (B, K, h, w)
        if target_codes is not None:
            z = F.one_hot(target_codes, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)  # (B, K, h, w)
        elif hard:
            probs = F.softmax(logits.float(), dim=1).permute(0, 2, 3, 1)  # (B, h, w, K)
            codes = torch.distributions.Categorical(probs=probs).sample()  # (B, h, w)
            z = F.one_hot(codes, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)  # (B, K, h, w)
        else:
            z = gumbel_softmax(logits, tau).to(logits.dtype)
        decoded = self.decoder(z)
        c = x.shape[1]
        recon = logit_laplace_log_prob(x, decoded[:, :c], decoded[:, c:]).sum(dim=(1, 2, 3))  # (B,)
        kl = kl_to_uniform(logits)  # (B,)
        dims = x.shape[1] * x.shape[2] * x.shape[3]
        if target_codes is not None:
            ce = F.cross_entropy(logits.float(), target_codes, reduction="none").sum(dim=(1, 2))  # (B,)
            loss = ((-recon + ce) / dims).mean()
        else:
            loss = ((-recon + beta * kl) / dims).mean()
        return DVAEOutput(loss, recon.mean(), kl.mean(), logits, decoded)

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Mapped pixels (B, C, H, W) -> code grid (B, h, w) int64: the argmax, no gumbel noise."""
        return self.encoder(x).argmax(dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
