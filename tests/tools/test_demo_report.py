"""tools/demo_report.py's figures on hand-made inputs (the end-to-end run is in tests/test_sample_cli.py)."""

import math

import pytest
import torch
from demo_report import dvae_report, perplexity, psnr

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
