"""The dVAE objective (Sec. 2.1, App. A.3): logit-Laplace reconstruction, gumbel-softmax relaxation,
KL to the uniform prior over the codebook; the loss is divided by H*W*C (so beta/192 per code at 256 px).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """phi: [0, 1] -> [eps, 1 - eps], phi(x) = (1 - 2 eps) x + eps (pixels / 255 in)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """phi^-1, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_log_prob(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise ln f(x | mu, b) on (0, 1), f = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32, whatever the activations are
    x, mu, log_b = x.to(dtype), mu.to(dtype), log_b.to(dtype)
    logit = torch.log(x) - torch.log1p(-x)
    return -math.log(2.0) - log_b - torch.log(x) - torch.log1p(-x) - (logit - mu).abs() * torch.exp(-log_b)


def reconstruction(decoded: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, 2C, H, W) -> image (B, C, H, W) in [0, 1]: phi^-1(sigmoid(mu)), ln b ignored."""
    c = decoded.shape[1] // 2
    return unmap_pixels(torch.sigmoid(decoded[:, :c].float()))


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform) per image, summed over positions: sum q (ln q + ln K). logits (B, K, h, w) -> (B,)."""
    logq = F.log_softmax(logits.float(), dim=1)
    return (logq.exp() * (logq + math.log(logits.shape[1]))).sum(dim=(1, 2, 3))
