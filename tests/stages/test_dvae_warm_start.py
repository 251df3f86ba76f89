"""The dVAE's k-means warm start (dvae.warm_start_steps): schedules, codebook, what it teaches, and the optimizer
moments reset where it ends, in plain PyTorch, under ZeRO-3 on 2 ranks, and through train.py."""

import json
import math
import re
import subprocess

import pytest
import torch

from megadalle.config import ConfigError, load_config
from megadalle.data.loader import eval_images
from megadalle.models.dvae_loss import map_pixels, reconstruction
from megadalle.models.kmeans import cell_codes
from megadalle.stages.dvae import DVAEStage
from tests.conftest import REPO, python, torchrun


def warm_cfg(shards, *extra: str):
    return load_config(["--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={shards}",
                        "--dvae.warm_start_steps=10", "--dvae.warm_start_images=32", *extra])  # fmt: skip


def test_schedules_count_from_the_end_of_the_warm_start(emoji_shards):
    cfg = warm_cfg(emoji_shards)
    stage = DVAEStage(cfg)
    assert [stage.schedules(s)["warm_start"] for s in (0, 9, 10, 11)] == [1.0, 1.0, 0.0, 0.0]
    assert stage.schedules(10)["tau"] == cfg.dvae.tau_start and stage.schedules(10)["beta"] == 0.0
    assert stage.schedules(10 + cfg.dvae.tau_steps)["tau"] == cfg.dvae.tau_end
    assert stage.schedules(10 + cfg.dvae.kl_warmup_steps)["beta"] == cfg.dvae.kl_weight
    assert stage.schedules(10)["lr"] == stage.lr_schedule.lr(10), "the step size counts from 0"
    assert stage.moments_reset_step == 10
    assert DVAEStage(load_config(["--config", "megadalle/configs/dvae_debug.toml"])).moments_reset_step is None


def test_elb_lr_scale_applies_after_the_warm_start_only(emoji_shards):
    stage = DVAEStage(warm_cfg(emoji_shards, "--dvae.elb_lr_scale=0.25"))
    assert stage.schedules(9)["lr"] == stage.lr_schedule.lr(9), "the warm start keeps the full step size"
    assert [stage.schedules(s)["lr"] for s in (10, 20)] == [0.25 * stage.lr_schedule.lr(s) for s in (10, 20)]
    with pytest.raises(ConfigError, match="dvae.elb_lr_scale = 0.25 scales the lr after a warm start, but dvae.wa"):
        load_config(["--config", "megadalle/configs/dvae_debug.toml", "--dvae.elb_lr_scale=0.25"])  # no warm start
    with pytest.raises(ConfigError, match="dvae.elb_lr_scale must be positive, got 0.0"):
        warm_cfg(emoji_shards, "--dvae.elb_lr_scale=0")


def test_warm_start_teaches_the_kmeans_codes(emoji_shards):
    """The codebook is deterministic; 60 warm-start updates on 32 images make the encoder predict their k-means
    codes and the decoder reconstruct from them far better than at initialisation (ln 256 = 5.5 nats is chance)."""
    cfg = warm_cfg(emoji_shards)
    stage = DVAEStage(cfg)
    centroids = stage.warm_start_centroids()
    assert centroids.shape == (cfg_vocab := stage.args.vocab_size, 48) or centroids.shape[0] < cfg_vocab
    assert torch.equal(centroids, DVAEStage(cfg).warm_start_centroids())
    images = next(eval_images(str(emoji_shards), "train", 32, 32, 32))[0]  # fit on 32 images: an overfit test
    x = map_pixels(images)
    codes = cell_codes(x, centroids, 4)  # (B, 8, 8)

    def ce_and_psnr(model) -> tuple[float, float]:
        with torch.no_grad():
            ce = float(torch.nn.functional.cross_entropy(model.encoder(x), codes))  # nats per cell
            recon = reconstruction(model.decoder.decode_codes(codes))
            return ce, 10 * math.log10(1 / float((recon - images).square().mean()))

    torch.manual_seed(0)
    model = stage.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = ce_and_psnr(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = x[torch.randperm(32, generator=g)[:8]]
        loss, _ = stage.loss(model, batch, stage.schedules(0), {"samples": len(batch)})  # the warm start's loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ce_and_psnr(model)
    assert after[0] < before[0] - 1, (before, after)
    assert after[1] > before[1] + 3, (before, after)


RESET_WORKER = """
import sys, torch, deepspeed, torch.distributed as dist
from megadalle.config import load_config
from megadalle.engine.ds_config import load_ds_config
from megadalle.engine.optim import reset_moments
from megadalle.stages.dvae import DVAEStage
from megadalle.train import train_update

deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config(["--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={sys.argv[1]}",
                   "--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--train.micro_batch_size=4",
                   "--dvae.warm_start_steps=2", "--dvae.warm_start_images=16"])
ds = load_ds_config(cfg, dist.get_world_size())
torch.manual_seed(0)
stage = DVAEStage(cfg)
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = stage.build_model()
opt = torch.optim.Adam(stage.param_groups(model), lr=1e-3)
engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
inner = opt.optimizer  # the torch Adam over ZeRO-3's flat fp32 partitions
batches = stage.batches(dist.get_rank())
for step in range(3):
    if step == stage.moments_reset_step:
        assert all(float(s["step"]) == 2 for s in inner.state.values()) and inner.state
        assert reset_moments(opt) == len(inner.param_groups) and not inner.state
    train_update(engine, opt, stage, [next(batches)], stage.schedules(step))
states = list(inner.state.values())
assert states and all(float(s["step"]) == 1 for s in states), [s["step"] for s in states]
assert all(torch.isfinite(s["exp_avg_sq"]).all() and s["exp_avg_sq"].abs().sum() > 0 for s in states)
print(f"rank {dist.get_rank()} reset ok", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_reset_moments_under_zero3_two_ranks(tmp_path, emoji_shards):
    script = tmp_path / "worker.py"
    script.write_text(RESET_WORKER)
    proc = torchrun(script, nproc=2, args=[str(emoji_shards)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 reset ok" in proc.stdout and "rank 1 reset ok" in proc.stdout


def test_train_py_warm_start_then_the_paper_objective(tmp_path, emoji_shards):
    proc = subprocess.run(
        [python(), "megadalle/train.py", "--config", "megadalle/configs/dvae_debug.toml",
         f"--data.shards={emoji_shards}", f"--job.run_root={tmp_path}", "--train.steps=4", "--train.eval_every=4",
         "--train.micro_batch_size=4", "--dvae.warm_start_steps=2", "--dvae.warm_start_images=16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "dvae warm start: k-means of" in out
    reset = re.search(r"step 2: optimizer moments reset \((\d+) tensors had state\)", out)
    assert reset and int(reset.group(1)) > 0, out[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "dvae_debug" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["warm_start"] for m in train] == [1.0, 1.0, 0.0, 0.0]
    assert all(math.isfinite(m["loss"]) for m in train)
    assert [m["step"] for m in lines if m["kind"] == "eval"] == [4]
