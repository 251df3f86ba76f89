"""Loaders over the webdataset shards: the endless, resumable training streams (data/stream.py; local or s3://
shard sets) and finite evaluation passes. Samples that fail are counted per shard, never silently dropped.

Which shards a split is (`split_source`): `data.val_shards` for val when set, else `data.shards`: a megadalle shard
set gives each split from its manifest; a source without a manifest (img2dataset's output: a folder of tars, a
brace pattern, a .txt list of URLs) is the train split alone, so it needs `data.val_shards` for validation and has
no zero-shot split."""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from megadalle.config import Data
from megadalle.data.images import DEFAULT_KEYS, check_shape, decode_image, image_member
from megadalle.data.s3 import S3Error, S3Settings, samples
from megadalle.data.shards import is_shard_set, read_any_manifest, shard_records
from megadalle.data.stream import SkipCounter, SkipSampleError, Stream
from megadalle.data.transforms import center_resize, dvae_augment, to_tensor

log = logging.getLogger(__name__)
__all__ = ["SkipCounter", "data_splits", "eval_images", "eval_samples", "eval_tokens", "s3_settings", "split_source",
           "train_images", "train_tokens"]  # fmt: skip


def s3_settings(data: Data) -> S3Settings:
    """How s3:// shard sets are reached, from the [data] section."""
    return S3Settings(endpoint_url=data.s3_endpoint or None, max_retry_s=data.s3_max_retry_s,
                      read_ahead=data.read_ahead, verify=data.verify_sha256)  # fmt: skip


def split_source(data: Data, split: str) -> str | None:
    """The source of `split`'s shards (shards.shard_records reads it), or None for a split a source without a
    manifest does not have (zeroshot)."""
    if split == "val" and data.val_shards:
        return data.val_shards
    if split == "train" or is_shard_set(data.shards, s3_settings(data)):
        return data.shards
    if split == "val":
        raise ValueError(
            f"data.shards={data.shards} has no manifest, so it is the train split alone: name the "
            f"validation shards in data.val_shards (or index both with tools/index_shards.py)"
        )
    return None


def data_splits(data: Data) -> list[str]:
    """The splits `data` has: a shard set's (its manifest's), else train, and val when data.val_shards names it."""
    if is_shard_set(data.shards, s3_settings(data)):
        splits = list(read_any_manifest(data.shards, s3_settings(data))["splits"])
        return splits + (["val"] if data.val_shards and "val" not in splits else [])
    return ["train"] + (["val"] if data.val_shards else [])


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

    return _stream(data, split_source(data, "train"), item, batch_size, rank, seed, skips, world)


def eval_images(data: Data | str, split: str, image_size: int, batch_size: int, limit: int = 0) -> Iterator[tuple]:
    """Finite pass over a split (`data`: the [data] section, or a shard set's path) in order: (images (B, 3, S, S),
    captions, metadata with "key")."""
    return eval_samples(data, split, lambda s: to_tensor(center_resize(s["image"], image_size)), batch_size, limit)


def eval_samples(
    data: Data | str, split: str, first: Callable[[dict], torch.Tensor], batch_size: int, limit: int = 0
) -> Iterator[tuple]:
    """Finite pass over an image split in order with a custom view: (first(sample) stacked, captions, metadata
    with "key"); sample["image"] is the decoded (H, W, 3) uint8 image. Used to encode augmented views. Nothing for
    a split the data does not have (split_source)."""
    data = Data(shards=data) if isinstance(data, str) else data
    source = split_source(data, split)
    if source is None:
        return iter(())
    urls = [url for url, _ in shard_records(source, split, s3_settings(data))]
    return _finite_batches(urls, first, batch_size, limit, s3_settings(data), data.image_keys, data.caption_key)


def _finite_batches(
    urls: list[str],
    first: Callable[[dict], torch.Tensor],
    batch_size: int,
    limit: int,
    settings: S3Settings,
    image_keys: str = DEFAULT_KEYS,
    caption_key: str = "txt",
) -> Iterator[tuple]:
    """(first(sample), caption, metadata) collated in batches, at most `limit` samples (0: all), from local or s3://
    shards. Every caller reads the whole split (evaluation then keeps its rank's share of the batches; sampling): no
    split by rank. A sample whose image or caption cannot be read is skipped, the same ones every pass, and the
    pass's skips are logged by reason at its end; a shard that cannot be read at all is an error."""
    import webdataset as wds

    decode = wds.autodecode.Decoder([])  # txt, json, npy; the image below (data/images.py)
    batch: list = []
    seen = 0
    skipped: Counter = Counter()
    for sample in samples(urls, settings):
        sample = decode(sample)
        try:
            if "tokens.npy" not in sample:  # an image set (a token set's samples hold tokens.npy)
                sample["image"] = decode_image(image_member(sample, image_keys))
            caption = sample.get(caption_key)
            if not isinstance(caption, str) or not caption.strip():
                raise SkipSampleError("no caption")
        except SkipSampleError as e:
            skipped[str(e)] += 1
            continue
        batch.append((first(sample), caption, dict(sample.get("json") or {}, key=sample["__key__"])))
        seen += 1
        if len(batch) == batch_size or seen == limit:
            yield _collate(batch)
            batch = []
        if seen == limit:
            return
    if batch:
        yield _collate(batch)
    if skipped:
        log.warning(f"a pass over {len(urls)} shards from {urls[0]} skipped {sum(skipped.values())} samples "
                    f"({', '.join(f'{n} {why}' for why, n in sorted(skipped.items()))})")  # fmt: skip


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
    if data.verify_sha256 and not any("sha256" in r for r in records.values()):
        raise ValueError(f"data.verify_sha256: {root} has no manifest with checksums (tools/index_shards.py "
                         f"writes one)")  # fmt: skip
    return Stream(list(records), item, batch_size, rank=rank, world=world or world_size(), seed=seed,
                  workers=data.num_workers, shuffle_buffer=data.shuffle_buffer, collate=_collate, settings=settings,
                  skips=skips, records=records)  # fmt: skip


def eval_tokens(
    root: str, split: str, batch_size: int, limit: int = 0, settings: S3Settings | None = None
) -> Iterator[tuple]:
    """Finite pass over a token split in manifest order: (codes (B, h*w), captions, metadata with "key"); of K
    encodings (K, h, w), the first (the central view)."""
    settings = settings or S3Settings()
    urls = [url for url, _ in shard_records(root, split, settings)]
    return _finite_batches(urls, lambda s: _codes(s["tokens.npy"]), batch_size, limit, settings)


def _codes(tokens: np.ndarray, rng: random.Random | None = None) -> torch.Tensor:
    """(h, w) int16 grid, or (K, h, w) grids of K views -> (h*w,) int64 raster order: view 0 without an rng,
    else a view drawn uniformly."""
    if tokens.ndim == 3:
        tokens = tokens[rng.randrange(tokens.shape[0]) if rng is not None else 0]  # (h, w)
    elif tokens.ndim != 2:
        raise ValueError(f"token array of shape {tokens.shape} is neither (h, w) nor (K, h, w)")
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(-1))  # (h*w,)


def read_shard(
    url: str, make_item: Callable[[dict], Any], skips: Counter, known: int = 0, settings: S3Settings | None = None
) -> Iterator[Any]:
    """Every usable `make_item(sample)` of one shard, in its order (a single pass: tools/encode_shards.py). A sample
    whose item fails is counted in `skips` by reason (SkipSampleError's message, else the exception's type); corrupt
    tar data is read past, and at the end the samples a count `known` (a manifest record, an img2dataset
    `_stats.json`) expected that the tar did not hold are counted as lost; with no count, a broken tar counts once."""
    settings = settings or S3Settings()
    broken: list[str] = []

    def handler(exn: Exception) -> bool:
        if isinstance(exn, S3Error):  # the object could not be read: an error, not corruption
            raise exn
        broken.append(type(exn).__name__)
        return True

    read = 0
    for sample in samples([url], settings, handler=handler):
        read += 1
        try:
            item = make_item(sample)
        except SkipSampleError as e:
            skips[str(e)] += 1
            continue
        yield item
    why = f"corrupt tar ({broken[0]})" if broken else "tar ended early"
    if known > read:
        skips[why] += known - read
    elif broken and not known:
        skips[why] += 1
