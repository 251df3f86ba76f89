"""Stage 2, the transformer prior: token shards + BPE captions -> 1/8 text + 7/8 image cross-entropy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megadalle.config import ConfigError, JobConfig
from megadalle.data.loader import SkipCounter, eval_images, eval_tokens, s3_settings, train_images, train_tokens
from megadalle.data.shards import read_any_manifest
from megadalle.data.transforms import prior_augment
from megadalle.engine import distributed
from megadalle.engine.optim import param_groups
from megadalle.engine.schedules import lr_schedule
from megadalle.models.dvae_loss import map_pixels
from megadalle.models.sparsity import attended_pairs, layer_kinds
from megadalle.models.tokenizer import PAD_ID, BPETokenizer
from megadalle.models.transformer import FLAVORS, DallePrior, PriorArgs, check_token_ranges, flops_per_sample
from megadalle.stages.base import StreamedData, eval_share
from megadalle.stages.load import load_trained

READABLE = ["loss", "text_loss", "image_loss", "lr", "grad_norm", "tokens_per_s", "tflops", "memory_mb"]


def prior_args(cfg: JobConfig) -> PriorArgs:
    if cfg.model.prior_flavor not in FLAVORS:
        raise ConfigError(f"model.prior_flavor: unknown flavor {cfg.model.prior_flavor!r} (known: {sorted(FLAVORS)})")
    return FLAVORS[cfg.model.prior_flavor]


def check_data(a: PriorArgs, manifest: dict[str, Any], tokens: str, tok: BPETokenizer, cfg: JobConfig) -> None:
    """The token shards, the tokenizer and the flavor must agree; say which and where when they do not."""
    if manifest.get("content") != "tokens":
        raise ConfigError(f"prior.tokens={tokens} is not a token shard set (write one with tools/encode_shards.py)")
    if manifest["grid"] != [a.grid, a.grid] or manifest["vocab_size"] != a.image_vocab:
        raise ConfigError(
            f"prior.tokens={tokens} has {manifest['grid'][0]}x{manifest['grid'][1]} grids of {manifest['vocab_size']} "
            f"codes but model.prior_flavor={cfg.model.prior_flavor} takes {a.grid}x{a.grid} of {a.image_vocab}"
        )
    if tok.max_len != a.text_len:
        raise ConfigError(f"tokenizer.max_len={tok.max_len} but model.prior_flavor takes {a.text_len} text positions")
    if tok.vocab_size > a.text_vocab:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer.model_path} has {tok.vocab_size} pieces, more than the flavor's text vocab "
            f"{a.text_vocab}"
        )


class PriorStage(StreamedData):
    readable = READABLE

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.args = prior_args(cfg)
        self.skips = SkipCounter()
        t = cfg.tokenizer
        self.tokenizer = BPETokenizer(t.model_path, t.max_len, t.dropout, t.lowercase)
        self.dvae = None
        if cfg.model.dvae_checkpoint:  # encode images on the fly with a frozen dVAE instead of token shards
            self.dvae = load_trained(cfg.model.dvae_checkpoint, "dvae")[0]
            d = self.dvae.args
            manifest = {"content": "tokens", "grid": [d.grid_size] * 2, "vocab_size": d.vocab_size}
            check_data(self.args, manifest, f"{cfg.model.dvae_checkpoint} (frozen dVAE)", self.tokenizer, cfg)
        else:
            check_data(
                self.args,
                read_any_manifest(cfg.prior.tokens, s3_settings(cfg.data)),
                cfg.prior.tokens,
                self.tokenizer,
                cfg,
            )
        a = self.args
        self.flops = flops_per_sample(
            a, attended_pairs(layer_kinds(a.n_layers), a.text_len, a.grid, a.grid, a.conv_kernel)
        )
        self.lr_schedule = lr_schedule(cfg, cfg.prior.lr_decay_steps)

    def build_model(self) -> DallePrior:
        return DallePrior(self.args, self.cfg.model.attention)

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Weight decay on the matmul weights; none on gains, biases, embeddings and unembeddings."""
        return param_groups(model, self.cfg.optim.weight_decay)

    def schedules(self, step: int) -> dict[str, float]:
        return {"lr": self.lr_schedule.lr(step)}

    def batches(self, rank: int, state: dict[str, Any] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(BPE ids (B, T) with BPE-dropout, image codes (B, H W)) micro-batches."""
        c = self.cfg
        self.tokenizer.train()  # BPE-dropout on training captions
        self.tokenizer.seed(c.job.seed * 1009 + rank)  # the same tokenisations in a replayed stream
        if self.dvae is None:
            self.stream = train_tokens(c.data, c.prior.tokens, c.train.micro_batch_size, rank, c.job.seed, self.skips)
            stream: Iterator = iter(self.stream)
        else:
            size = self.dvae.args.image_size
            self.stream = train_images(c.data, size, c.train.micro_batch_size, rank, c.job.seed, self.skips,
                                       prior_augment)  # fmt: skip
            stream = self._encoded()
        self._restore(state)  # now, not at the first batch: a position that does not apply raises here
        return self._tokenized(stream)

    def _tokenized(self, stream: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for codes, captions in stream:
            text, _ = self.tokenizer.encode_batch(captions)
            check_token_ranges(self.args, text, codes)  # on the CPU, before the batch reaches a device
            yield text, codes

    def _encoded(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """(codes (B, h*w), captions) from image shards through the frozen dVAE (argmax, no gumbel noise)."""
        d = self.dvae
        for images, captions in self.stream:
            with torch.no_grad():
                codes = d.encode_codes(map_pixels(images)).flatten(1)  # (B, h*w)
            yield codes, captions

    def counts(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """Text targets are the real text tokens after the first; every image token is a target."""
        text, codes = batch
        return {"samples": len(text), "text_targets": (text[:, 1:] != PAD_ID).sum(), "image_targets": codes.numel()}

    def loss(
        self,
        model: nn.Module,
        batch: tuple[torch.Tensor, torch.Tensor],
        sched: dict[str, float],
        totals: dict[str, float],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """1/8 text + 7/8 image cross-entropy, each normalised by its target count in the global batch."""
        text, codes = batch
        out = model(text, codes)
        text_loss = out.text_nll / max(totals["text_targets"], 1.0)
        image_loss = out.image_nll / totals["image_targets"]
        w = self.args.text_loss_weight
        loss = w * text_loss + (1 - w) * image_loss
        return loss, {"loss": loss.detach(), "text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    def throughput(self, samples_per_s: float) -> dict[str, float]:
        return {
            "samples_per_s": samples_per_s,
            "tokens_per_s": samples_per_s * self.args.seq_len,
            "tflops": samples_per_s * self.flops / 1e12,
            "truncated_captions": self.tokenizer.stats.truncated,
        }

    def _eval_batches(self, split: str, limit: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """(image codes (B, H W) or, with a frozen dVAE, images (B, 3, S, S) for `_codes`, captions)."""
        c = self.cfg
        if self.dvae is None:
            for codes, captions, _ in eval_tokens(
                c.prior.tokens, split, c.train.micro_batch_size, limit, s3_settings(c.data)
            ):
                yield codes, captions
            return
        size = self.dvae.args.image_size
        for images, captions, _ in eval_images(c.data, split, size, c.train.micro_batch_size, limit):
            yield images, captions

    def _codes(self, codes_or_images: torch.Tensor) -> torch.Tensor:
        """An `_eval_batches` item's image codes (B, H W): images are encoded by the frozen dVAE (a plain model, on
        the CPU and outside any autocast the evaluation runs under, as in training's data path)."""
        if self.dvae is None:
            return codes_or_images
        with torch.autocast("cpu", enabled=False):
            return self.dvae.encode_codes(map_pixels(codes_or_images)).flatten(1)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, step: int, out_dir: Path, device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """Collective (stages/base.py): validation and zero-shot losses of `model` (a DallePrior, or DeepSpeed's
        module of one with the EMA swapped in) over each split's first prior.eval_batches micro-batches, captions
        without BPE-dropout, normalised over the split's targets as training is over the global batch."""
        c = self.cfg
        rank, world = distributed.rank(), distributed.world_size()
        tok = BPETokenizer(c.tokenizer.model_path, c.tokenizer.max_len, 0.0, c.tokenizer.lowercase).eval()
        metrics: dict[str, float] = {}
        w = self.args.text_loss_weight
        limit = c.prior.eval_batches * c.train.micro_batch_size
        for split in ("val", "zeroshot"):
            sums = dict.fromkeys(("text_nll", "text_count", "image_nll", "image_count"), 0.0)  # float64 sums
            for _, (batch, captions), counted in eval_share(self._eval_batches(split, limit), rank, world):
                ids, codes = tok.encode_batch(captions)[0], self._codes(batch)
                out = model(ids.to(device), codes.to(device))  # one forward per batch on every rank
                if counted:
                    for k in sums:
                        sums[k] += float(getattr(out, k))
            sums = distributed.sum_over_ranks(sums)
            if sums["image_count"]:
                text, image = sums["text_nll"] / max(sums["text_count"], 1), sums["image_nll"] / sums["image_count"]
                metrics.update({f"{split}_loss": w * text + (1 - w) * image, f"{split}_text_loss": text,
                                f"{split}_image_loss": image})  # fmt: skip
        return metrics
