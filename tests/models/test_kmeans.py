"""k-means over code-cell patches (megadalle/models/kmeans.py): the dVAE warm start's codebook."""

import torch

from megadalle.models.kmeans import cell_codes, fit_kmeans, nearest, patches


def tiled(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images of 32 px tiled from k random 4x4 patches: (images, tiles (k, 3, 4, 4), picks (n, 8, 8))."""
    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(k, 3, 4, 4, generator=g)
    pick = torch.randint(0, k, (n, 8, 8), generator=g)
    images = tiles[pick].permute(0, 3, 1, 4, 2, 5).reshape(n, 3, 32, 32)  # (N, C, h f, w f)
    return images, tiles, pick


def test_kmeans_recovers_the_tiles_and_codes_index_them():
    images, tiles, pick = tiled(6, 5)
    centroids = fit_kmeans(patches(images, 4), 5, seed=3)
    assert centroids.shape == (5, 48)
    codes = cell_codes(images, centroids, 4)  # (N, 8, 8)
    assert codes.shape == (6, 8, 8) and codes.dtype == torch.int64
    assert torch.allclose(centroids[codes], tiles[pick].flatten(3), atol=1e-6)  # every cell decodes to its tile
    assert torch.equal(centroids, fit_kmeans(patches(images, 4), 5, seed=3))  # deterministic given the seed


def test_kmeans_k_larger_than_distinct_patches_and_chunked_nearest():
    images, _, _ = tiled(2, 3)
    assert len(fit_kmeans(patches(images, 4), 100)) == 3
    x, c = torch.randn(1000, 5), torch.randn(7, 5)
    assert torch.equal(nearest(x, c, chunk=64), torch.cdist(x, c).argmin(dim=1))
