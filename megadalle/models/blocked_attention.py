"""Block-sparse attention in plain PyTorch: the layer's block layout executed with batched matmuls, for the CPU
and as a portable fallback for the Triton kernel (kernels/block_sparse_attention.py).

q, k, v (B, nh, N, hd), N = T + H W. The stream splits where the mask's structure does:
  text queries   causal over the text: SDPA with is_causal (no mask tensor);
  image queries  every text key (a FULL region: one dense (HW, T) product), plus a band of `slots` image key
                 blocks per query block: blocks i - slots + 1 .. i, counted from the first image position. Every
                 layout of the prior is such a band (image keys never come after the query, and row, column in
                 transposed order and conv reach back a bounded distance), so the band is built from `slots`
                 shifted views of the keys, without an index gather (whose backward is a slow scatter).
One softmax runs over [text keys | band]. The element mask exists only for the band, as an additive bias
(nqb, block, slots * block): 0 where allowed, -inf elsewhere and on slots before the first block. Autograd gives
the backward.

Measured on the 2-core CPU (tools/bench_attention.py --cpu): see `faster_than_dense`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megadalle.models.sparsity import MaskSpec


class BlockedPlan:
    """The band width and bias of one (spec, block), built once on the CPU (modules keep the bias as a buffer)."""

    def __init__(self, spec: MaskSpec, block: int = 32) -> None:
        with torch.device("cpu"):  # real values even when the model is built under a meta-device context
            self._build(spec, block)

    def _build(self, spec: MaskSpec, block: int) -> None:
        t, hw = spec.text_len, spec.height * spec.width
        nb = -(-hw // block)
        pos = torch.arange(nb * block)  # padded image indices
        image = spec.allowed(t + pos[:, None], t + pos[None, :]) & (pos[:, None] < hw) & (pos[None, :] < hw)
        layout = image.view(nb, block, nb, block).any(dim=3).any(dim=1)  # (nb, nb) non-empty image blocks
        i = torch.arange(nb)
        first = torch.where(layout, i[None, :], nb).min(dim=1).values  # (nb,) first non-empty key block
        slots = int((i - first + 1).max())
        key_block = i[:, None] - (slots - 1) + torch.arange(slots)  # (nb, slots)
        keys = (key_block[:, :, None] * block + torch.arange(block)).view(nb, 1, slots * block)  # image key index
        ok = spec.allowed(t + pos.view(nb, block, 1), t + keys) & (keys >= 0) & (keys < hw)  # (nb, block, S b)
        ok[(pos >= hw).view(nb, block)] = True  # padding queries (dropped from the output) stay NaN-free
        self.bias = torch.zeros(nb, block, slots * block).masked_fill_(~ok, float("-inf"))
        self.spec, self.block, self.slots, self.n_blocks = spec, block, slots, nb
        self.visited_image_pairs = int(layout.sum()) * block * block

    def computed_fraction(self) -> float:
        """Score entries computed / N^2 (dense SDPA computes all N^2)."""
        t, n = self.spec.text_len, self.spec.n
        hw = n - t
        return (t * (t + 1) / 2 + hw * t + hw * self.slots * self.block) / n**2


def faster_than_dense(plan: BlockedPlan) -> bool:
    """Whether `auto` should use this plan on the CPU instead of dense masked SDPA. Measured on the 2-core CPU by
    tools/bench_attention.py --cpu (training step, d 256 = 4 heads of 64; computed fraction in brackets):
    256 + 32x32 row 2.4x (0.22), column 3.1x (0.20), conv 1.4x (0.30); 64 + 16x16 row 1.3x (0.34), column 1.8x
    (0.26), conv 0.8x (0.50). Short streams (the demo's 96 positions) stay dense: launches cost more than the
    skipped pairs save."""
    return plan.spec.n >= 256 and plan.computed_fraction() <= 0.35


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockedPlan, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, nh, N, hd): block-sparse masked attention, equal to dense masked SDPA up to rounding. `bias`: the
    plan's bias on q's device (a module's buffer), default plan.bias."""
    B, nh, N, hd = q.shape
    t, b, nb, s = plan.spec.text_len, plan.block, plan.n_blocks, plan.slots
    hw = N - t
    if N != plan.spec.n:
        raise ValueError(f"blocked attention planned for {plan.spec.n} positions, got {N}")
    pad = nb * b - hw
    (qt, qi), (kt, ki), (vt, vi) = (x.split([t, hw], dim=2) for x in (q, k, v))  # split: no slice-backward fills
    out_text = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True) if t else qt  # (B, nh, T, hd)
    qi = F.pad(qi, (0, 0, 0, pad)) if pad else qi  # (B, nh, nb b, hd)

    def band(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, (s - 1) * b, pad)).view(B, nh, nb + s - 1, b, hd)  # (B, nh, nb + s - 1, b, hd)
        # reshape, not view: contiguous in eager (a view), but under torch.compile stack's traced strides are not
        return torch.stack([x[:, :, j : j + nb] for j in range(s)], dim=3).reshape(B * nh * nb, s * b, hd)

    kb, vb = band(ki), band(vi)  # (B nh nb, S b, hd)
    bias = (plan.bias if bias is None else bias).to(q.dtype)  # (nb, b, S b)
    scale = 1.0 / math.sqrt(hd)
    s_img = torch.bmm(qi.reshape(B * nh * nb, b, hd), kb.transpose(1, 2)).mul_(scale)  # (B nh nb, b, S b)
    s_img.view(B * nh, nb, b, s * b).add_(bias)  # in place, broadcast: bmm's backward needs its inputs only
    s_txt = (qi @ kt.transpose(-1, -2)) * scale  # (B, nh, nb b, T)
    p = torch.cat([s_txt.view(B * nh * nb, b, t), s_img], dim=-1).softmax(dim=-1)  # (B nh nb, b, T + S b)
    p_txt, p_img = p.split([t, s * b], dim=-1)
    out = p_txt.reshape(B, nh, nb * b, t) @ vt + torch.bmm(p_img, vb).view(B, nh, nb * b, hd)  # (B, nh, nb b, hd)
    return torch.cat([out_text, out[:, :, :hw]], dim=2)
