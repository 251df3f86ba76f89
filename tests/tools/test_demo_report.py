"""tools/demo_report.py's figures on hand-made inputs (the end-to-end run is in tests/test_sample_cli.py)."""

import math

import pytest
import torch
from demo_report import dvae_report, first_choice_x_chance, kmeans_psnr, patches, perplexity, psnr

from megadalle.models.dvae import FLAVORS, DiscreteVAE


def test_perplexity_and_psnr():
    assert perplexity(torch.ones(8)) == pytest.approx(8)
    assert perplexity(torch.tensor([0, 5, 0])) == pytest.approx(1)
    assert psnr(0.01 * 100, 100) == pytest.approx(20)
    assert math.isnan(psnr(0.0, 0))


def test_content_cells_and_colour_error():
    torch.manual_seed(0)
    dvae = DiscreteVAE(FLAVORS["debug"]).eval()  # 32 px -> 8x8 cells of 4x4 pixels
    images = torch.ones(2, 3, 32, 32)
    images[1, :, :16, :12] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # a red block: 4 rows x 3 columns of cells
    rep, recon, codes = dvae_report(dvae, images)
    assert rep["content_cell_fraction"] == pytest.approx(12 / 128)
    assert recon.shape == images.shape and codes.shape == (2, 8, 8)
    want_mae = (recon.mean(dim=(2, 3)) - images.mean(dim=(2, 3))).abs().mean()
    assert rep["mean_rgb_mae"] == pytest.approx(float(want_mae))
    se = (recon - images).square()
    content = torch.zeros_like(images, dtype=torch.bool)
    content[1, :, :16, :12] = True
    assert rep["content_psnr_db"] == pytest.approx(10 * math.log10(content.sum() / se[content].sum()), rel=1e-5)
    assert 1 <= rep["content_perplexity"] <= 12 and rep["images"] == 2


def test_patches_and_kmeans_yardstick():
    """Images tiled from 3 distinct 4x4 patches: 3 centroids reproduce them exactly, 1 centroid cannot."""
    torch.manual_seed(0)
    tiles = torch.rand(3, 3, 4, 4)  # (K, C, f, f)
    pick = torch.randint(0, 3, (6, 8, 8))  # (N, h, w)
    images = tiles[pick].permute(0, 3, 1, 4, 2, 5).reshape(6, 3, 32, 32)  # (N, C, h f, w f)
    p = patches(images, 4)  # (N h w, C f f)
    assert p.shape == (6 * 64, 48) and torch.equal(p[0], tiles[pick[0, 0, 0]].flatten())
    assert kmeans_psnr(images[:4], images[4:], 4, 3) > 60  # exact up to float rounding
    assert kmeans_psnr(images[:4], images[4:], 4, 1) < 20
    assert kmeans_psnr(images[:1], images[4:], 4, 10_000) > 60  # more codes than patches: k = the patches


def test_first_choice_x_chance_and_its_standard_error():
    """6 images for 3 captions (2 each): 3 rank their own caption first, so a share of 1/2 is 1.5x chance (1/3),
    with the binomial standard error sqrt(1/2 * 1/2 / 6) x 3; none or all ranking it first leave no noise."""
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.zeros(6, 3)  # (M, C)
    scores[torch.arange(6), torch.tensor([0, 1, 1, 2, 0, 2])] = 1.0  # own caption first for images 0, 2, 5
    x, se = first_choice_x_chance(scores, owner)
    assert x == pytest.approx(1.5) and se == pytest.approx(math.sqrt(0.25 / 6) * 3)
    assert first_choice_x_chance(scores[[0, 2, 5]], owner[[0, 2, 5]]) == (3.0, 0.0)
    assert first_choice_x_chance(scores[[1, 3, 4]], owner[[1, 3, 4]]) == (0.0, 0.0)
