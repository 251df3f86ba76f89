"""Stage 1, the dVAE: model, schedules, one training step, and the evaluation (with EMA weights in training)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from megadalle.config import ConfigError, JobConfig
from megadalle.data.loader import SkipCounter, eval_images, train_images
from megadalle.data.transforms import to_uint8
from megadalle.engine import distributed
from megadalle.engine.optim import param_groups
from megadalle.engine.schedules import LRSchedule, cosine
from megadalle.evaluation import perplexity
from megadalle.models.dvae import FLAVORS, DiscreteVAE, DVAEArgs
from megadalle.models.dvae_loss import map_pixels, reconstruction
from megadalle.models.kmeans import cell_codes, fit_kmeans, patches
from megadalle.stages.base import StreamedData, eval_share

log = logging.getLogger(__name__)

READABLE = ["loss", "recon_nats", "kl_nats", "tau", "beta", "lr", "grad_norm", "images_per_s"]


def dvae_args(cfg: JobConfig) -> DVAEArgs:
    if cfg.model.dvae_flavor not in FLAVORS:
        raise ConfigError(f"model.dvae_flavor: unknown flavor {cfg.model.dvae_flavor!r} (known: {sorted(FLAVORS)})")
    return FLAVORS[cfg.model.dvae_flavor]


class DVAEStage(StreamedData):
    readable = READABLE

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.args = dvae_args(cfg)
        self.skips = SkipCounter()
        self._centroids: torch.Tensor | None = None
        # Adam's moments from the warm start's cross-entropy would scale the first steps of the ELB: measured, they
        # collapse a warm-started codebook to one code within 250 updates; fresh moments keep it (configs/dvae_small)
        self.moments_reset_step = cfg.dvae.warm_start_steps or None
        o = cfg.optim
        # the paper's dVAE step size: a cosine from lr to lr_min over dvae.lr_decay_steps, no warm-up
        self.lr_schedule = LRSchedule("cosine", o.lr, 0, o.lr_min, cfg.dvae.lr_decay_steps)

    def build_model(self) -> DiscreteVAE:
        return DiscreteVAE(self.args)

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Weight decay on conv kernels only, not on biases."""
        return param_groups(model, self.cfg.optim.weight_decay)

    def schedules(self, step: int) -> dict[str, float]:
        """tau and beta count from the end of the warm start (dvae.warm_start_steps, 0 for the paper); lr from 0,
        times dvae.elb_lr_scale after a warm start."""
        d = self.cfg.dvae
        after = step - d.warm_start_steps
        scale = d.elb_lr_scale if after >= 0 else 1.0  # config: elb_lr_scale is 1 without a warm start
        sched = {
            "tau": cosine(after, d.tau_start, d.tau_end, d.tau_steps),
            "beta": cosine(after, 0.0, d.kl_weight, d.kl_warmup_steps),
            "lr": self.lr_schedule.lr(step) * scale,
        }
        if d.warm_start_steps:
            sched["warm_start"] = float(after < 0)
        return sched

    def warm_start_centroids(self) -> torch.Tensor:
        """The warm start's k-means codebook (vocab, C f f) over mapped pixels, fit once per process on the first
        dvae.warm_start_images train images (centre crops at the training scale: crops of the stored image, as
        Listing 1 takes them), seeded by job.seed; rank 0's is broadcast, so every rank trains towards the same
        codes. A run resumed inside the warm start fits it again, identically."""
        if self._centroids is None:
            c, a = self.cfg, self.args
            n, size = c.dvae.warm_start_images, a.image_size
            stored = max(c.data.image_size, size)
            t0 = time.time()
            images, _, _ = next(eval_images(c.data, "train", stored, n, n))
            o = (stored - size) // 2
            images = images[:, :, o : o + size, o : o + size]  # (N, C, S, S) centre crops
            centroids = fit_kmeans(patches(map_pixels(images), a.downsample), a.vocab_size, seed=c.job.seed)
            if dist.is_initialized() and dist.get_world_size() > 1:
                on = centroids.cuda() if dist.get_backend() == "nccl" else centroids  # nccl sends device tensors
                dist.broadcast(on, src=0)
                centroids = on.cpu()
            self._centroids = centroids
            log.info(
                "dvae warm start: k-means of %d codes over %d patches of %d train images in %.1f s",
                len(self._centroids), len(images) * a.grid_size**2, len(images), time.time() - t0,
            )  # fmt: skip
        return self._centroids

    def batches(self, rank: int, state: dict[str, Any] | None = None) -> Iterator[torch.Tensor]:
        """Mapped pixels (B, 3, S, S) augmented by Listing 1."""
        c = self.cfg
        self.stream = train_images(c.data, self.args.image_size, c.train.micro_batch_size, rank, c.job.seed, self.skips)
        self._restore(state)  # now, not at the first batch: a position that does not apply raises here
        return (map_pixels(images) for images, _captions in self.stream)

    def counts(self, x: torch.Tensor) -> dict[str, float]:
        return {"samples": len(x)}

    def loss(
        self, model: nn.Module, x: torch.Tensor, sched: dict[str, float], totals: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-image objective averaged over the global batch. x stays fp32: it is also the likelihood's
        target, and bf16 would merge pixel levels (the model casts the encoder's input itself)."""
        if sched.get("warm_start"):
            codes = cell_codes(x, self.warm_start_centroids().to(x.device), self.args.downsample)  # (B, h, w)
            out = model(x, sched["tau"], sched["beta"], target_codes=codes)
        else:
            out = model(x, sched["tau"], sched["beta"])
        share = len(x) / totals["samples"]
        loss = out.loss * share
        # share of the codebook the micro-batch's argmax codes use (the mean over micro-batches, at most B h w / K, so
        # comparable only at one micro-batch size): collapse shows here long before an evaluation
        k = out.logits.shape[1]
        used = (torch.bincount(out.logits.detach().argmax(dim=1).flatten(), minlength=k) > 0).float().mean()
        stats = {
            "loss": loss.detach(),
            "recon_nats": out.recon.detach() * share,
            "kl_nats": out.kl.detach() * share,
            "batch_codes_used_fraction": used * share,  # a device tensor: no host sync in the step
        }
        return loss, stats

    def throughput(self, samples_per_s: float) -> dict[str, float]:
        return {}  # images/s is logged for every stage

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, step: int, out_dir: Path, device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """Collective (stages/base.py): validation of `model` (a DiscreteVAE, or DeepSpeed's module of one with the
        EMA swapped in): relaxed and hard ELB (nats/dim), MSE/PSNR of the argmax reconstruction, codebook usage and
        perplexity over the val split's first dvae.eval_batches micro-batches; rank 0 writes the reconstruction grid
        PNG of batch 0. Batch i draws its gumbel and code samples from the i-th seed of a generator seeded by
        job.seed, whichever rank evaluates it: the same samples at every evaluation and every world size."""
        c, a = self.cfg, self.args
        device = torch.device(device)
        rank, world = distributed.rank(), distributed.world_size()
        tau = self.schedules(step)["tau"]
        sums = dict.fromkeys(("elb_relaxed", "elb_hard", "mse", "images"), 0.0)  # Python floats: float64 sums
        counts = torch.zeros(a.vocab_size, dtype=torch.long, device=device)
        gen = torch.Generator().manual_seed(c.job.seed)
        seeds: list[int] = []  # seeds[i]: batch i's
        limit = c.dvae.eval_batches * c.train.micro_batch_size
        val = eval_images(c.data, "val", a.image_size, c.train.micro_batch_size, limit)
        for i, (images, _captions, _meta), counted in eval_share(val, rank, world):
            while len(seeds) <= i:
                seeds.append(int(torch.randint(0, 2**31, (1,), generator=gen)))
            images = images.to(device)
            x = map_pixels(images)
            # the same three model calls on every rank, stand-ins included (ZeRO-3 gathers in each)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seeds[i])
                soft = model(x, tau, 1.0)
                hard = model(x, tau, 1.0, hard=True)
            codes = soft.logits.argmax(dim=1)  # (B, h, w)
            recon = reconstruction(model.decoder.decode_codes(codes))  # (B, C, H, W) fp32 in [0, 1]
            if not counted:
                continue
            b = images.shape[0]
            sums["elb_relaxed"] += float(-soft.loss) * b
            sums["elb_hard"] += float(-hard.loss) * b
            sums["mse"] += float((recon - images).square().mean(dim=(1, 2, 3)).sum())
            sums["images"] += b
            counts += torch.bincount(codes.flatten(), minlength=a.vocab_size)
            if i == 0:  # on rank 0
                g = c.dvae.grid_images
                write_grid(images[:g].cpu(), recon[:g].cpu(), out_dir / f"recon_step{step:08d}.png")
        sums = distributed.sum_over_ranks(sums)
        counts = distributed.sum_tensor_over_ranks(counts).cpu()
        n = int(sums["images"])
        if n == 0:
            raise ValueError(f"the validation split of {c.data.val_shards or c.data.shards} is empty")
        mse = sums["mse"] / n
        return {
            "elb_relaxed_nats_per_dim": sums["elb_relaxed"] / n,
            "elb_hard_nats_per_dim": sums["elb_hard"] / n,
            "mse": mse,
            "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "codebook_used_fraction": float((counts > 0).float().mean()),
            "codebook_perplexity": perplexity(counts),
            "val_images": n,
            "dims": a.channels * a.image_size**2,
        }


def write_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """Originals in the top row, reconstructions below (as the paper's Figure 1). (B, 3, H, W) in [0, 1]."""
    rows = [torch.cat(list(originals), dim=2), torch.cat(list(recons), dim=2)]  # each (3, H, B*W)
    img = to_uint8(torch.cat(rows, dim=1))  # (2H, B*W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(img).save(tmp)
    tmp.replace(path)
