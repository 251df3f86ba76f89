"""Loaders over the webdataset shards: the endless, resumable training streams (data/stream.py; local or s3://
shard sets) and finite evaluation passes. Samples that fail are counted per shard, never silently dropped."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from megadalle.data.shards import shard_urls, split_urls
from megadalle.data.stream import Stream
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
    world: int | None = None,
    workers: int = 0,
) -> Stream:
    """Endless (images (B, 3, S, S) in [0, 1], captions) batches of the train split, epoch after epoch, this rank's
    share of each (data/stream.py: resumable, `state()` / `load_state()`). `augment(img, S, rng)` is the paper's
    listing of the stage: dvae_augment (Listing 1) for the dVAE, prior_augment (Listing 2) for the prior; its rng
    is seeded by (seed, rank, epoch, sample key), so a resumed stream augments as the first run did."""

    def item(sample: dict) -> tuple[torch.Tensor, str]:
        with Image.open(io.BytesIO(sample["png"])) as im:
            img = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        rng = random.Random(f"{seed}/{rank}/{sample['__epoch__']}/{sample['__key__']}")
        return to_tensor(augment(img, image_size, rng)), sample["txt"].decode("utf-8")

    return _stream(root, item, batch_size, rank, seed, skips, shuffle_buffer, world, workers)


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
    root: str,
    batch_size: int,
    rank: int,
    seed: int,
    skips: SkipCounter,
    shuffle_buffer: int = 1000,
    world: int | None = None,
    workers: int = 0,
) -> Stream:
    """Endless (image codes (B, h*w) int64 in raster order, captions) batches from token shards, as train_images.
    A sample holding K augmented encodings (K, h, w) contributes one of them, drawn with a per-sample rng."""

    def item(sample: dict) -> tuple[torch.Tensor, str]:
        rng = random.Random(f"{seed}/{rank}/{sample['__epoch__']}/{sample['__key__']}")
        return _codes(np.load(io.BytesIO(sample["tokens.npy"])), rng), sample["txt"].decode("utf-8")

    return _stream(root, item, batch_size, rank, seed, skips, shuffle_buffer, world, workers)


def _stream(root, item, batch_size, rank, seed, skips, shuffle_buffer, world, workers) -> Stream:
    from megadalle.engine.distributed import world_size

    world = world or world_size()
    urls = shard_urls(root, "train")
    return Stream(urls, item, batch_size, rank=rank, world=world, seed=seed, workers=workers,
                  shuffle_buffer=shuffle_buffer, collate=_collate, skips_out=skips.counts)  # fmt: skip


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
