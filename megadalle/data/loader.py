"""Loaders over the webdataset shards: the endless, resumable training streams (data/stream.py; local or s3://
shard sets) and finite evaluation passes. Samples that fail are counted per shard, never silently dropped.

Which shards a split is (`split_source`): `data.val_shards` for val when set, else `data.shards`: a megadalle shard
set gives each split from its manifest; a source without a manifest (img2dataset's output: a folder of tars, a
brace pattern, a .txt list of URLs) is the train split alone, so it needs `data.val_shards` for validation and has
no zero-shot split."""

from __future__ import annotations

import io
import json
import logging
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from megadalle.config import Data
from megadalle.data.images import DEFAULT_KEYS, check_shape, decode_image, image_member
from megadalle.data.s3 import S3Settings, TarDamage, samples
from megadalle.data.shards import expected_samples, is_shard_set, read_any_manifest, shard_records
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


def caption_of(sample: dict, max_chars: int, key: str = "txt") -> str:
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
        text = caption_of(sample, data.max_caption_chars, data.caption_key)
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
    a split the data does not have (split_source). `data` as a string: a shard set, whose manifest gives `split`, or
    a source without a manifest, which is `split`'s shards."""
    if isinstance(data, str):
        data = Data(shards=data) if is_shard_set(data, S3Settings()) else Data(shards=data, val_shards=data)
    source = split_source(data, split)
    if source is None:
        return iter(())
    settings = s3_settings(data)
    return _finite_batches(shard_records(source, split, settings), first, batch_size, limit, settings,
                           data.image_keys, data.caption_key)  # fmt: skip


def sample_meta(sample: dict) -> dict:
    """A sample's `json` member as a dict ({} when it has none or it is not a JSON object: metadata is optional)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _finite_batches(
    records: list[tuple[str, dict]],
    first: Callable[[dict], torch.Tensor],
    batch_size: int,
    limit: int,
    settings: S3Settings,
    image_keys: str = DEFAULT_KEYS,
    caption_key: str = "txt",
) -> Iterator[tuple]:
    """(first(sample), caption, metadata) collated in batches, at most `limit` samples (0: all), from local or s3://
    shards, each as (url, manifest record). Every caller reads the whole split (evaluation then keeps its rank's
    share of the batches; sampling): no split by rank. A sample whose image or caption cannot be read is skipped,
    the same ones every pass, and so are the samples a cut or corrupt tar lost (read_shard); the pass's skips are
    logged by reason when it ends. A shard that cannot be read at all is an error."""

    def item(sample: dict) -> tuple:
        caption = caption_of(sample, sys.maxsize, caption_key)
        if "tokens.npy" in sample:  # a token set
            sample["tokens.npy"] = np.load(io.BytesIO(sample["tokens.npy"]))
        else:
            sample["image"] = decode_image(image_member(sample, image_keys))
        return first(sample), caption, dict(sample_meta(sample), key=sample["__key__"])

    batch: list = []
    seen = 0
    skipped: Counter = Counter()
    try:
        for url, record in records:
            known = int(record.get("samples", 0)) or expected_samples(url, settings) or 0
            for row in read_shard(url, item, skipped, known, settings):
                batch.append(row)
                seen += 1
                if len(batch) == batch_size or seen == limit:
                    yield collate(batch)
                    batch = []
                if seen == limit:
                    return
        if batch:
            yield collate(batch)
    finally:
        if skipped:
            log.warning(f"a pass over {len(records)} shards from {records[0][0]} skipped {sum(skipped.values())} "
                        f"samples ({', '.join(f'{n} {why}' for why, n in sorted(skipped.items()))})")  # fmt: skip


def collate(items: list[tuple]) -> tuple:
    """Items (tensor, values...) -> (stacked tensors, lists of the values)."""
    cols = list(zip(*items))
    return (torch.stack(cols[0]), *[list(c) for c in cols[1:]])


def train_tokens(
    data: Data, root: str, batch_size: int, rank: int, seed: int, skips: SkipCounter, world: int | None = None
) -> Stream:
    """Endless (image codes (B, h*w) int64 in raster order, captions) batches from the token shard set `root`, as
    train_images. A sample holding K augmented encodings (K, h, w) contributes one of them, drawn with a
    per-sample rng."""

    def item(sample: dict) -> tuple[torch.Tensor, str]:
        text = caption_of(sample, data.max_caption_chars)
        rng = random.Random(f"{seed}/{rank}/{sample['__epoch__']}/{sample['__key__']}")
        try:
            codes = np.load(io.BytesIO(sample["tokens.npy"]))
        except (KeyError, OSError, ValueError):
            raise SkipSampleError("unreadable codes") from None
        return _codes(codes, rng), text

    return _stream(data, root, item, batch_size, rank, seed, skips, world)


def _stream(data: Data, root: str, item: Callable, batch_size: int, rank: int, seed: int, skips: SkipCounter,
            world: int | None) -> Stream:  # fmt: skip
    from megadalle.engine.distributed import from_main, world_size

    settings = s3_settings(data)
    records = from_main(lambda: dict(shard_records(root, "train", settings)))  # one listing, not one per rank
    if data.verify_sha256 and not any("sha256" in r for r in records.values()):
        raise ValueError(f"data.verify_sha256: {root} has no manifest with checksums (tools/index_shards.py "
                         f"writes one)")  # fmt: skip
    return Stream(list(records), item, batch_size, rank=rank, world=world or world_size(), seed=seed,
                  workers=data.num_workers, shuffle_buffer=data.shuffle_buffer, collate=collate, settings=settings,
                  skips=skips, records=records)  # fmt: skip


def eval_tokens(
    root: str, split: str, batch_size: int, limit: int = 0, settings: S3Settings | None = None
) -> Iterator[tuple]:
    """Finite pass over a token split in manifest order: (codes (B, h*w), captions, metadata with "key"); of K
    encodings (K, h, w), the first (the central view)."""
    settings = settings or S3Settings()
    first = lambda s: _codes(s["tokens.npy"])  # noqa: E731
    return _finite_batches(shard_records(root, split, settings), first, batch_size, limit, settings)


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
    """Every usable `make_item(sample)` of one shard, in its order (a single pass: evaluation, tools/encode_shards.py).
    A sample whose item raises SkipSampleError is counted in `skips` under its reason; corrupt tar data is read past,
    and at the end the samples a count `known` (a manifest record, an img2dataset `_stats.json`; 0: none) expected
    that the tar did not hold are counted as lost; with no count, a broken tar counts once."""
    damage, read = TarDamage(), 0
    for sample in samples([url], settings or S3Settings(), handler=damage):
        read += 1
        try:
            item = make_item(sample)
        except SkipSampleError as e:
            skips[str(e)] += 1
            continue
        yield item
    if lost := damage.losses(known, read):
        skips[damage.reason] += lost


def captions(data: Data | str, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Caption texts (`data.caption_key`) of the given splits of `data` (the [data] section, or a shard set's path;
    any source, local or s3://), for tools/train_tokenizer.py. Zero-shot captions stay unseen, like their images; a
    split the data does not have is left out; what a cut or corrupt tar still holds is used, and a warning says how
    many shards were damaged."""
    data = Data(shards=data) if isinstance(data, str) else data
    settings, texts, damaged = s3_settings(data), [], []
    for split in splits:
        source = split_source(data, split) if split in data_splits(data) else None
        for url, _ in shard_records(source, split, settings) if source else ():
            damage = TarDamage()
            texts += [s[data.caption_key].decode("utf-8", errors="replace")
                      for s in samples([url], settings, handler=damage) if data.caption_key in s]  # fmt: skip
            damaged += [url] if damage.seen else []
    if damaged:
        log.warning(f"read past corrupt or cut tar data in {len(damaged)} shards (first: {damaged[0]}); the captions "
                    f"before it are used")  # fmt: skip
    return texts
