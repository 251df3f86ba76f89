"""The stages' evaluation in one process on a plain model, and how batches are shared among ranks
(tests/engine/test_distributed_eval.py runs it on 2 ZeRO-3 ranks)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from megadalle.stages.base import eval_share


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", range(9))
def test_eval_share_gives_each_batch_to_one_rank_and_every_rank_the_same_count(n, world):
    batches = [f"batch {i}" for i in range(n)]
    counted: list[int] = []
    for rank in range(world):
        share = list(eval_share(iter(batches), rank, world))
        assert len(share) == -(-n // world), "every rank makes the same number of model calls"
        for i, batch, own in share:
            assert batch == batches[i]
            if own:
                assert i % world == rank
                counted.append(i)
            else:  # a stand-in: the last, partial round's first batch, for a rank past its end
                assert i == n - n % world and rank >= n % world
    assert sorted(counted) == list(range(n)), "each batch counted once"


def test_eval_share_checks_the_rank():
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        list(eval_share([1, 2], 2, 2))


def test_dvae_evaluate_on_a_plain_model(emoji_shards, tmp_path):
    from megadalle.config import load_config
    from megadalle.data.loader import eval_images
    from megadalle.evaluation import perplexity
    from megadalle.models.dvae_loss import map_pixels
    from megadalle.stages.dvae import DVAEStage

    cfg = load_config(["--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={emoji_shards}",
                       "--train.micro_batch_size=4", "--dvae.eval_batches=3", "--dvae.grid_images=4"])  # fmt: skip
    stage = DVAEStage(cfg)
    torch.manual_seed(0)
    model = stage.build_model().eval()
    m = stage.evaluate(model, 5, tmp_path)
    assert m == stage.evaluate(model, 5, tmp_path), "the same gumbel and code samples at every evaluation"
    assert m["val_images"] == 12 and m["dims"] == 3 * 32 * 32
    assert math.isfinite(m["psnr_db"]) and m["psnr_db"] == pytest.approx(10 * math.log10(1 / m["mse"]))

    # the previous meaning: batch i samples from the i-th seed of job.seed's generator; the codebook histogram
    # counts every cell of every image once
    gen = torch.Generator().manual_seed(cfg.job.seed)
    counts = torch.zeros(256, dtype=torch.long)
    relaxed = 0.0
    tau = stage.schedules(5)["tau"]
    with torch.no_grad():
        for images, _, _ in eval_images(str(emoji_shards), "val", 32, 4, 12):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
                out = model(map_pixels(images), tau, 1.0)
            relaxed += float(-out.loss) * len(images)
            counts += torch.bincount(out.logits.argmax(dim=1).flatten(), minlength=256)
    assert int(counts.sum()) == 12 * 8 * 8
    assert m["elb_relaxed_nats_per_dim"] == pytest.approx(relaxed / 12, rel=1e-6)
    assert m["codebook_used_fraction"] == float((counts > 0).float().mean())
    assert m["codebook_perplexity"] == pytest.approx(perplexity(counts), rel=1e-12)
    grid = np.asarray(Image.open(tmp_path / "recon_step00000005.png"))
    assert grid.shape == (2 * 32, 4 * 32, 3)  # originals above reconstructions
