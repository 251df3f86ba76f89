"""The attention masks of the DALL-E prior (Sec. 2.2, App. B.1, Fig. 11) as pure functions.

The stream is `text_len` text positions then an `height x width` image grid in raster order (N = T + H W).
A mask is a bool tensor (N, N), True where query q may attend to key k:
  text -> text     causal;
  text -> image    never;
  image -> text    always (every image token sees all T text positions);
  image -> image   by layer kind:
    row     the previous width + 1 raster positions, itself included (the last one seen is the same column
            in the previous row);
    column  the tokens of its own column in earlier rows, and itself. The model transposes the image states
            (rows <-> columns) before attention, so this mask is stated in *transposed* order, where it is
            causal inside contiguous groups of `height` tokens: block-sparse friendly. `transposed=False`
            gives the same relation in raster order;
    conv    the kernel x kernel neighbourhood centred on the token, restricted to positions no later in raster
            order. The paper says "with wraparound behaviour (similar to the row attention)" and leaves the
            borders undefined. Our reading: columns wrap modulo the width (a window reaching past the left or
            right edge continues on the other side, as the row mask's window continues at the end of the
            previous row); rows are clipped at the top (wrapping rows would make the last rows' tokens
            "earlier" neighbours of the first rows, which raster causality excludes anyway for the bottom and
            would be meaningless for the top).

Layer schedule (1-based i of n layers): the last layer is conv; otherwise column if (i - 2) mod 4 == 0, else row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["row", "column", "conv"]
MaskKind = Literal["row", "column", "conv", "causal"]
"""The layer kinds plus `causal` (image attends image causally): the dense-causal layout, for tests and benchmarks."""
EMPTY, PARTIAL, FULL = 0, 1, 2


def layer_kinds(n_layers: int) -> list[Kind]:
    """["row", "column", "row", "row", "row", "column", ..., "conv"] for 1-based layers 1..n."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    kinds: list[Kind] = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers)]
    return kinds + ["conv"]


def image_transpose_perm(height: int, width: int) -> torch.Tensor:
    """perm (H W,) such that states_t = states[perm] lists the image column by column:
    transposed index c * H + r holds raster position r * W + c."""
    r = torch.arange(height).repeat(width)  # (W H,): r for each (c, r)
    c = torch.arange(width).repeat_interleave(height)
    return r * width + c


def _image_image(kind: Kind, height: int, width: int, kernel: int, transposed: bool) -> torch.Tensor:
    """(H W, H W) bool mask among image positions (raster order, or transposed order for `column`)."""
    n = height * width
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    if kind == "row":
        return (k <= q) & (q - k <= width)
    if kind == "column":
        if transposed:  # causal inside contiguous groups of `height`
            return (k <= q) & (q // height == k // height)
        return (k <= q) & (q % width == k % width)
    if kind == "causal":
        return k <= q
    if kind == "conv":
        if kernel % 2 != 1:
            raise ValueError(f"conv kernel must be odd, got {kernel}")
        half = kernel // 2
        qr, qc, kr, kc = q // width, q % width, k // width, k % width
        dc = (kc - qc + half) % width  # column offset wrapped modulo the width, shifted to [0, W)
        near_col = dc <= 2 * half if 2 * half < width else torch.ones_like(dc, dtype=torch.bool)
        return (k <= q) & ((qr - kr).abs() <= half) & near_col
    raise ValueError(f"unknown layer kind {kind!r} (row, column, conv, causal)")


def attention_mask(
    kind: MaskKind, text_len: int, height: int, width: int, kernel: int = 11, transposed: bool = True
) -> torch.Tensor:
    """(N, N) bool, N = text_len + height * width. For `column` the image part is in transposed order unless
    `transposed=False`."""
    if text_len < 0 or height < 1 or width < 1:
        raise ValueError(f"bad stream shape: text_len={text_len}, grid {height}x{width}")
    t, n = text_len, text_len + height * width
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    mask[t:, :t] = True
    mask[t:, t:] = _image_image(kind, height, width, kernel, transposed and kind == "column")
    return mask


@dataclass(frozen=True)
class MaskSpec:
    """A layer's mask as its definition rather than its (N, N) matrix: what the block-sparse kernels evaluate
    element by element on partial blocks. A frozen value: equal specs are the same mask (usable as a cache key).
    `column` is in transposed order, as the model attends, unless `transposed=False` (raster order, for
    incremental decoding)."""

    kind: MaskKind
    text_len: int
    height: int
    width: int
    kernel: int = 11
    transposed: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("row", "column", "conv", "causal"):
            raise ValueError(f"unknown layer kind {self.kind!r} (row, column, conv, causal)")
        if self.text_len < 0 or self.height < 1 or self.width < 1:
            raise ValueError(f"bad stream shape: text_len={self.text_len}, grid {self.height}x{self.width}")
        if self.kind == "conv" and self.kernel % 2 != 1:
            raise ValueError(f"conv kernel must be odd, got {self.kernel}")

    @property
    def n(self) -> int:
        return self.text_len + self.height * self.width

    def dense(self) -> torch.Tensor:
        """(N, N) bool: the reference matrix (`attention_mask`)."""
        return attention_mask(self.kind, self.text_len, self.height, self.width, self.kernel, self.transposed)

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whether stream position q may attend to k, for broadcastable integer tensors of positions in [0, N):
        the same arithmetic as the Triton kernel's `_allowed`, in PyTorch."""
        t, h, w, half = self.text_len, self.height, self.width, self.kernel // 2
        i, j = q - t, k - t  # image indices (negative for text)
        if self.kind == "row":
            image = i - j <= w
        elif self.kind == "column" and self.transposed:
            image = torch.div(i, h, rounding_mode="floor") == torch.div(j, h, rounding_mode="floor")
        elif self.kind == "column":
            image = i % w == j % w
        elif self.kind == "conv":
            qr, qc = torch.div(i, w, rounding_mode="floor"), i % w
            kr, kc = torch.div(j, w, rounding_mode="floor"), j % w
            near_col = ((kc - qc + half) % w <= 2 * half) | (2 * half >= w)
            image = (qr - kr <= half) & near_col
        else:
            image = torch.ones((), dtype=torch.bool)
        return (k <= q) & ((j < 0) | image)

    def layout(self, block: int) -> torch.Tensor:
        """(ceil(N/block), ceil(N/block)) int8 block layout (EMPTY, PARTIAL, FULL)."""
        return block_layout(self.dense(), block)


def block_layout(mask: torch.Tensor, block: int) -> torch.Tensor:
    """(ceil(N/block), ceil(N/block)) int8: EMPTY, PARTIAL or FULL per block of the mask. Blocks at the edge
    count only their in-range entries."""
    n_q, n_k = mask.shape
    bq, bk = -(-n_q // block), -(-n_k // block)
    padded = torch.zeros(bq * block, bk * block, dtype=torch.int32)
    valid = torch.zeros_like(padded)
    padded[:n_q, :n_k] = mask.int()
    valid[:n_q, :n_k] = 1
    ones = padded.view(bq, block, bk, block).sum(dim=(1, 3))  # (bq, bk)
    size = valid.view(bq, block, bk, block).sum(dim=(1, 3))
    layout = torch.full((bq, bk), PARTIAL, dtype=torch.int8)
    layout[ones == 0] = EMPTY
    layout[ones == size] = FULL
    return layout


def density(mask: torch.Tensor) -> float:
    """Attended pairs / causal pairs (the paper's figure of sparsity)."""
    n = mask.shape[0]
    return float(mask.sum()) / (n * (n + 1) / 2)


def attended_pairs(kinds: list[Kind], text_len: int, height: int, width: int, kernel: int = 11) -> list[int]:
    """Attended (q, k) pairs per layer, for FLOP accounting."""
    cache: dict[Kind, int] = {}
    for kind in set(kinds):
        cache[kind] = int(attention_mask(kind, text_len, height, width, kernel).sum())
    return [cache[k] for k in kinds]
