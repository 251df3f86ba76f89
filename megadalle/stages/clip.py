"""The contrastive reranker's stage: image shards + BPE captions -> InfoNCE; retrieval R@1/R@5 on val."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megadalle.config import ConfigError, JobConfig
from megadalle.data.loader import SkipCounter, eval_images, train_images
from megadalle.data.transforms import prior_augment
from megadalle.engine import distributed
from megadalle.engine.optim import param_groups
from megadalle.engine.schedules import lr_schedule
from megadalle.models.clip import FLAVORS, ClipArgs, ContrastiveModel, recall_at_k
from megadalle.models.tokenizer import BPETokenizer
from megadalle.stages.base import StreamedData, eval_share

READABLE = ["loss", "logit_scale", "lr", "grad_norm", "images_per_s"]


def clip_args(cfg: JobConfig) -> ClipArgs:
    if cfg.model.clip_flavor not in FLAVORS:
        raise ConfigError(f"model.clip_flavor: unknown flavor {cfg.model.clip_flavor!r} (known: {sorted(FLAVORS)})")
    a = FLAVORS[cfg.model.clip_flavor]
    if cfg.tokenizer.max_len != a.text_len:
        raise ConfigError(f"tokenizer.max_len={cfg.tokenizer.max_len} but model.clip_flavor takes {a.text_len} tokens")
    return a


class ClipStage(StreamedData):
    readable = READABLE

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.args = clip_args(cfg)
        self.skips = SkipCounter()
        self.lr_schedule = lr_schedule(cfg, max(1, cfg.train.steps - cfg.optim.warmup_steps))
        t = cfg.tokenizer
        self.tokenizer = BPETokenizer(t.model_path, t.max_len, t.dropout, t.lowercase)
        if self.tokenizer.vocab_size > self.args.text_vocab:
            raise ConfigError(
                f"tokenizer has {self.tokenizer.vocab_size} pieces > clip text vocab {self.args.text_vocab}"
            )

    def build_model(self) -> ContrastiveModel:
        return ContrastiveModel(self.args)

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Weight decay on linear and conv weights; none on norms, biases, embeddings and the temperature."""
        return param_groups(model, self.cfg.optim.weight_decay)

    def schedules(self, step: int) -> dict[str, float]:
        return {"lr": self.lr_schedule.lr(step)}

    def batches(self, rank: int, state: dict[str, Any] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images (B, 3, S, S) in [0, 1], BPE ids (B, T)) micro-batches with BPE-dropout."""
        c = self.cfg
        self.tokenizer.train()
        self.tokenizer.seed(c.job.seed * 1009 + rank)  # the same tokenisations in a replayed stream
        # Listing 2's crops: no flip for a model that reads captions
        self.stream = train_images(c.data, self.args.image_size, c.train.micro_batch_size, rank, c.job.seed,
                                   self.skips, prior_augment)  # fmt: skip
        self._restore(state)  # now, not at the first batch: a position that does not apply raises here
        return ((images, self.tokenizer.encode_batch(captions)[0]) for images, captions in self.stream)

    def counts(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        return {"samples": len(batch[0])}

    def loss(
        self,
        model: nn.Module,
        batch: tuple[torch.Tensor, torch.Tensor],
        sched: dict[str, float],
        totals: dict[str, float],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """InfoNCE among the micro-batch's pairs (negatives: the other pairs of the same micro-batch), weighted by
        the micro-batch's share of the global batch."""
        images, text = batch
        out = model(images, text)
        share = len(images) / totals["samples"]
        loss = out.loss * share
        return loss, {"loss": loss.detach(), "logit_scale": out.scale.detach() * share}

    def throughput(self, samples_per_s: float) -> dict[str, float]:
        return {}  # images/s is logged for every stage

    def _eval_batches(self, split: str, sizes: list[int]) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """(images, captions) batches of 64 of the split's first train.eval_samples; appends each batch's size to
        `sizes` as it is read."""
        c = self.cfg
        for images, captions, _ in eval_images(c.data, split, self.args.image_size, 64, c.train.eval_samples):
            sizes.append(len(images))
            yield images, captions

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, step: int, out_dir: Path, device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """Collective (stages/base.py): retrieval among the first train.eval_samples pairs of val and of zeroshot:
        R@1 and R@5, image->text and text->image; chance is k / N. Each rank embeds its batches; the (N, d)
        embeddings (small) are then added over ranks into one matrix in batch order, zeros elsewhere (exact), and
        every rank ranks the same similarities."""
        c = self.cfg
        rank, world = distributed.rank(), distributed.world_size()
        tok = BPETokenizer(c.tokenizer.model_path, c.tokenizer.max_len, 0.0, c.tokenizer.lowercase).eval()
        metrics: dict[str, float] = {}
        for split in ("val", "zeroshot"):
            sizes: list[int] = []
            mine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for i, (images, captions), counted in eval_share(self._eval_batches(split, sizes), rank, world):
                img = model.embed_images(images.to(device))  # (B, d) fp32, both calls on every rank
                txt = model.embed_text(tok.encode_batch(captions)[0].to(device))  # (B, d)
                if counted:
                    mine[i] = img, txt
            if not sizes:
                continue
            offsets = [0, *itertools.accumulate(sizes)]
            both = torch.zeros(2, offsets[-1], img.shape[1], device=device)  # (2, N, d): images, texts
            for i, (img, txt) in mine.items():
                both[0, offsets[i] : offsets[i + 1]] = img
                both[1, offsets[i] : offsets[i + 1]] = txt
            both = distributed.sum_tensor_over_ranks(both).cpu()
            with torch.autocast("cpu", enabled=False):  # fp32: under train.autocast bf16 similarities would tie
                sim = both[0] @ both[1].T  # (N, d) x (d, N) -> (N, N)
            metrics.update({
                f"{split}_n": float(len(sim)),
                f"{split}_i2t_r1": recall_at_k(sim, 1), f"{split}_i2t_r5": recall_at_k(sim, 5),
                f"{split}_t2i_r1": recall_at_k(sim.T, 1), f"{split}_t2i_r5": recall_at_k(sim.T, 5),
            })  # fmt: skip
        return metrics
