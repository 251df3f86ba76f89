"""k-means over the code cells' pixel patches: the demo dVAE's warm start (stages/dvae.py) and the report's
yardstick of what a codebook of K patches achieves (tools/demo_report.py)."""

from __future__ import annotations

import torch


def patches(images: torch.Tensor, f: int) -> torch.Tensor:
    """(N, C, S, S) -> (N * (S/f)^2, C f f): the f x f patch of each code cell, flattened, cells in raster order."""
    c = images.shape[1]
    p = images.unfold(2, f, f).unfold(3, f, f)  # (N, C, S/f, S/f, f, f)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * f * f)


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest centroid (K, D) of each row of x (P, D) -> (P,) int64, in chunks of rows."""
    return torch.cat([torch.cdist(x[i : i + chunk], centroids).argmin(dim=1) for i in range(0, len(x), chunk)])


def fit_kmeans(x: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on the rows of x (P, D) -> centroids (min(k, distinct rows), D), deterministic given seed.
    Seeds are distinct rows (a repeated white background would otherwise seed duplicates); a cluster that empties
    restarts at a random row."""
    distinct = torch.unique(x, dim=0)
    k = min(k, len(distinct))
    g = torch.Generator().manual_seed(seed)
    centroids = distinct[torch.randperm(len(distinct), generator=g)[:k]].clone()  # (k, D)
    for _ in range(iters):
        owner = nearest(x, centroids)  # (P,)
        sums = torch.zeros_like(centroids).index_add_(0, owner, x)
        n = torch.bincount(owner, minlength=k).unsqueeze(1)  # (k, 1)
        reseed = x[torch.randint(0, len(x), (k,), generator=g)]
        centroids = torch.where(n > 0, sums / n.clamp(min=1), reseed)
    return centroids


def cell_codes(images: torch.Tensor, centroids: torch.Tensor, f: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, S/f, S/f) int64: the nearest centroid of each code cell's patch."""
    b, _, s, _ = images.shape
    return nearest(patches(images, f), centroids).view(b, s // f, s // f)
