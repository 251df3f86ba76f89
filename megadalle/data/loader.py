"""Streaming loaders over the webdataset shards: an endless, per-rank-seeded training stream and a finite
evaluation pass. Samples that fail to decode are counted, never silently dropped."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds

from megadalle.data.shards import split_urls
from megadalle.data.transforms import center_resize, dvae_augment, to_tensor


@dataclass
class SkipCounter:
    """Samples a loader could not use, by reason; logged with the metrics."""

    counts: dict[str, int] = field(default_factory=dict)

    def handler(self, exn: Exception) -> bool:
        key = type(exn).__name__
        self.counts[key] = self.counts.get(key, 0) + 1
        return True  # continue with the next sample

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def train_images(
    root: str,
    image_size: int,
    batch_size: int,
    rank: int,
    seed: int,
    skips: SkipCounter,
    shuffle_buffer: int = 1000,
    augment: Callable[[np.ndarray, int, random.Random], np.ndarray] = dvae_augment,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless (images (B, 3, S, S) in [0, 1], captions) batches; shards resampled with a rank-specific seed so
    every rank draws a different stream and no rank runs dry before another. `augment(img, S, rng)` is the
    paper's listing of the stage: dvae_augment (Listing 1) for the dVAE, prior_augment (Listing 2) for the prior."""
    rng = random.Random(seed * 1_000_003 + rank)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(split_urls(root, "train"), seed=seed, worker_seed=lambda: rank, deterministic=True),
        wds.tarfile_to_samples(handler=skips.handler),
        wds.shuffle(shuffle_buffer, rng=random.Random(seed + 7919 * rank)),
        wds.decode("rgb8", handler=skips.handler),
        wds.to_tuple("png", "txt", handler=skips.handler),
        wds.map_tuple(lambda im: to_tensor(augment(im, image_size, rng)), lambda t: t),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    yield from pipeline


def eval_images(root: str, split: str, image_size: int, batch_size: int, limit: int = 0) -> Iterator[tuple]:
    """Finite pass over a split in manifest order: (images (B, 3, S, S), captions, metadata with "key")."""
    return _finite_batches(
        root, split, "rgb8", lambda s: to_tensor(center_resize(s["png"], image_size)), batch_size, limit
    )


def eval_samples(
    root: str, split: str, first: Callable[[dict], torch.Tensor], batch_size: int, limit: int = 0
) -> Iterator[tuple]:
    """Finite pass over an image split in manifest order with a custom view: (first(sample) stacked, captions,
    metadata with "key"); sample["png"] is the decoded (H, W, 3) uint8 image. Used to encode augmented views."""
    return _finite_batches(root, split, "rgb8", first, batch_size, limit)


def _finite_batches(root: str, split: str, decode: str, first, batch_size: int, limit: int) -> Iterator[tuple]:
    """(first(sample), caption, metadata) collated in batches, at most `limit` samples (0: all). Every caller
    reads the whole split (evaluation on one rank, encoding, sampling): no node splitting."""
    ds = wds.WebDataset(split_urls(root, split), shardshuffle=False, empty_check=False, nodesplitter=_all_shards)
    batch: list = []
    seen = 0
    for sample in ds.decode(decode):
        batch.append((first(sample), sample["txt"], dict(sample["json"], key=sample["__key__"])))
        seen += 1
        if len(batch) == batch_size or seen == limit:
            yield _collate(batch)
            batch = []
        if seen == limit:
            return
    if batch:
        yield _collate(batch)


def _all_shards(urls: list) -> list:
    return urls


def _collate(samples: list[tuple]) -> tuple:
    cols = list(zip(*samples))
    return (torch.stack(cols[0]), *[list(c) for c in cols[1:]])


def train_tokens(
    root: str, batch_size: int, rank: int, seed: int, skips: SkipCounter, shuffle_buffer: int = 1000
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless (image codes (B, h*w) int64 in raster order, captions) batches from token shards. A sample holding
    K augmented encodings (K, h, w) contributes one of them, drawn uniformly with a rank-seeded rng."""
    rng = random.Random(seed * 1_000_003 + rank)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(split_urls(root, "train"), seed=seed, worker_seed=lambda: rank, deterministic=True),
        wds.tarfile_to_samples(handler=skips.handler),
        wds.shuffle(shuffle_buffer, rng=random.Random(seed + 7919 * rank)),
        wds.decode(handler=skips.handler),
        wds.to_tuple("tokens.npy", "txt", handler=skips.handler),
        wds.map_tuple(lambda tokens: _codes(tokens, rng), lambda t: t),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    yield from pipeline


def eval_tokens(root: str, split: str, batch_size: int, limit: int = 0) -> Iterator[tuple]:
    """Finite pass over a token split in manifest order: (codes (B, h*w), captions, metadata with "key"); of K
    encodings (K, h, w), the first (the central view)."""
    return _finite_batches(root, split, "rgb8", lambda s: _codes(s["tokens.npy"]), batch_size, limit)


def _codes(tokens: np.ndarray, rng: random.Random | None = None) -> torch.Tensor:
    """(h, w) int16 grid, or (K, h, w) grids of K views -> (h*w,) int64 raster order: view 0 without an rng,
    else a view drawn uniformly."""
    if tokens.ndim == 3:
        tokens = tokens[rng.randrange(tokens.shape[0]) if rng is not None else 0]  # (h, w)
    elif tokens.ndim != 2:
        raise ValueError(f"token array of shape {tokens.shape} is neither (h, w) nor (K, h, w)")
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1))  # (h*w,)
