"""Loaders over the webdataset shards: the endless, resumable training streams (data/stream.py; local or s3://
shard sets) and finite evaluation passes. Samples that fail are counted per shard, never silently dropped."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch

from megadalle.config import Data
from megadalle.data.images import DEFAULT_KEYS, check_shape, decode_image, image_member
from megadalle.data.s3 import S3Settings, samples
from megadalle.data.shards import shard_records, shard_urls
from megadalle.data.stream import SkipCounter, SkipSampleError, Stream
from megadalle.data.transforms import center_resize, dvae_augment, to_tensor

IMAGE_KEYS = DEFAULT_KEYS.split(";")
__all__ = ["SkipCounter", "eval_images", "eval_samples", "eval_tokens", "s3_settings", "train_images", "train_tokens"]


def s3_settings(data: Data) -> S3Settings:
    """How s3:// shard sets are reached, from the [data] section."""
    return S3Settings(endpoint_url=data.s3_endpoint or None, max_retry_s=data.s3_max_retry_s,
                      read_ahead=data.read_ahead, verify=data.verify_sha256)  # fmt: skip


def _caption(sample: dict, max_chars: int, key: str = "txt") -> str:
    """The sample's caption, or SkipSampleError: missing, not UTF-8, empty or longer than `max_chars` characters."""
    if key not in sample:
        raise SkipSampleError("no caption")
    try:
        text = sample[key].decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSampleError("caption not UTF-8") from None
    if not text.strip():
        raise SkipSampleError("empty caption")
    if len(text) > max_chars:
        raise SkipSampleError("over-long caption")
    return text


def train_images(
    data: Data,
    image_size: int,
    batch_size: int,
    rank: int,
    seed: int,
    skips: SkipCounter,
    augment: Callable[[np.ndarray, int, random.Random], np.ndarray] = dvae_augment,
    world: int | None = None,
) -> Stream:
    """Endless (images (B, 3, S, S) in [0, 1], captions) batches of the train split of `data.shards`, epoch after
    epoch, this rank's share of each (data/stream.py: resumable, `state()` / `load_state()`). `augment(img, S,
    rng)` is the paper's listing of the stage: dvae_augment (Listing 1) for the dVAE, prior_augment (Listing 2)
    for the prior; its rng is seeded by (seed, rank, epoch, sample key), so a resumed stream augments as the first
    run did. Undecodable images and unusable captions are skipped and counted in `skips`."""

    def item(sample: dict) -> tuple[torch.Tensor, str]:
        text = _caption(sample, data.max_caption_chars, data.caption_key)
        img = decode_image(image_member(sample, data.image_keys))  # (H, W, 3) uint8
        check_shape(img, data.min_image_side, data.max_aspect_ratio)
        rng = random.Random(f"{seed}/{rank}/{sample['__epoch__']}/{sample['__key__']}")
        return to_tensor(augment(img, image_size, rng)), text

    return _stream(data, data.shards, item, batch_size, rank, seed, skips, world)


def eval_images(
    root: str, split: str, image_size: int, batch_size: int, limit: int = 0, settings: S3Settings | None = None
) -> Iterator[tuple]:
    """Finite pass over a split in manifest order: (images (B, 3, S, S), captions, metadata with "key")."""
    return _finite_batches(
        root, split, lambda s: to_tensor(center_resize(s["image"], image_size)), batch_size, limit, settings
    )


def eval_samples(
    root: str,
    split: str,
    first: Callable[[dict], torch.Tensor],
    batch_size: int,
    limit: int = 0,
    settings: S3Settings | None = None,
) -> Iterator[tuple]:
    """Finite pass over an image split in manifest order with a custom view: (first(sample) stacked, captions,
    metadata with "key"); sample["image"] is the decoded (H, W, 3) uint8 image. Used to encode augmented views."""
    return _finite_batches(root, split, first, batch_size, limit, settings)


def _finite_batches(
    root: str,
    split: str,
    first: Callable[[dict], torch.Tensor],
    batch_size: int,
    limit: int,
    settings: S3Settings | None,
) -> Iterator[tuple]:
    """(first(sample), caption, metadata) collated in batches, at most `limit` samples (0: all), from a local or
    s3:// shard set. Every caller reads the whole split (evaluation then keeps its rank's share of the batches;
    encoding, sampling): no split by rank, and a sample that cannot be read is an error (an evaluation must see the
    same samples every time)."""
    import webdataset as wds

    settings = settings or S3Settings()
    decode = wds.autodecode.Decoder([])  # txt, json, npy; the image below (data/images.py)
    batch: list = []
    seen = 0
    for sample in samples(shard_urls(root, split, settings), settings):
        sample = decode(sample)
        if any(key in sample for key in IMAGE_KEYS):  # an image set (a token set's samples hold tokens.npy)
            try:
                sample["image"] = decode_image(image_member(sample, DEFAULT_KEYS))
            except SkipSampleError as e:
                raise ValueError(f"{root} ({split}): sample {sample['__key__']} of {sample.get('__url__')}: "
                                 f"{e}") from None  # fmt: skip
        batch.append((first(sample), sample["txt"], dict(sample.get("json") or {}, key=sample["__key__"])))
        seen += 1
        if len(batch) == batch_size or seen == limit:
            yield _collate(batch)
            batch = []
        if seen == limit:
            return
    if batch:
        yield _collate(batch)


def _collate(samples: list[tuple]) -> tuple:
    cols = list(zip(*samples))
    return (torch.stack(cols[0]), *[list(c) for c in cols[1:]])


def train_tokens(
    data: Data, root: str, batch_size: int, rank: int, seed: int, skips: SkipCounter, world: int | None = None
) -> Stream:
    """Endless (image codes (B, h*w) int64 in raster order, captions) batches from the token shard set `root`, as
    train_images. A sample holding K augmented encodings (K, h, w) contributes one of them, drawn with a
    per-sample rng."""

    def item(sample: dict) -> tuple[torch.Tensor, str]:
        text = _caption(sample, data.max_caption_chars)
        rng = random.Random(f"{seed}/{rank}/{sample['__epoch__']}/{sample['__key__']}")
        try:
            codes = np.load(io.BytesIO(sample["tokens.npy"]))
        except (KeyError, OSError, ValueError):
            raise SkipSampleError("unreadable codes") from None
        return _codes(codes, rng), text

    return _stream(data, root, item, batch_size, rank, seed, skips, world)


def _stream(data: Data, root: str, item: Callable, batch_size: int, rank: int, seed: int, skips: SkipCounter,
            world: int | None) -> Stream:  # fmt: skip
    from megadalle.engine.distributed import world_size

    settings = s3_settings(data)
    records = dict(shard_records(root, "train", settings))
    return Stream(list(records), item, batch_size, rank=rank, world=world or world_size(), seed=seed,
                  workers=data.num_workers, shuffle_buffer=data.shuffle_buffer, collate=_collate, settings=settings,
                  skips=skips, records=records)  # fmt: skip


def eval_tokens(
    root: str, split: str, batch_size: int, limit: int = 0, settings: S3Settings | None = None
) -> Iterator[tuple]:
    """Finite pass over a token split in manifest order: (codes (B, h*w), captions, metadata with "key"); of K
    encodings (K, h, w), the first (the central view)."""
    return _finite_batches(root, split, lambda s: _codes(s["tokens.npy"]), batch_size, limit, settings)


def _codes(tokens: np.ndarray, rng: random.Random | None = None) -> torch.Tensor:
    """(h, w) int16 grid, or (K, h, w) grids of K views -> (h*w,) int64 raster order: view 0 without an rng,
    else a view drawn uniformly."""
    if tokens.ndim == 3:
        tokens = tokens[rng.randrange(tokens.shape[0]) if rng is not None else 0]  # (h, w)
    elif tokens.ndim != 2:
        raise ValueError(f"token array of shape {tokens.shape} is neither (h, w) nor (K, h, w)")
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1))  # (h*w,)
