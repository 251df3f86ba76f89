"""Token shards for stage 2: image shards encoded by a trained dVAE, one token shard per input shard, on any
number of ranks (tools/encode_shards.py is the command line).

The input is a [data] section (data/loader.py's split_source: a shard set with a manifest, or img2dataset's output).
Rank 0 lists the input shards, resolves the checkpoint and computes the fingerprint of what the output depends on,
and sends them to every rank (`distributed.from_main`); input shard i of that list is encoded by rank i % world
into `<out>/<split>/<input name>.tar`, local or s3://. A shard is written under a temporary name and renamed
(uploaded: an S3 object appears whole) when complete, then its record `<input name>.record.json`: a rerun or a
requeued job, on any number of ranks, skips every shard whose record carries the same fingerprint and source, and
redoes the others. Every rank then reports whether it failed (one all-reduce, also the barrier); when none did,
rank 0 reads the records (in a thread pool: 41,456 shards are 41,456 small GETs), checks their fingerprints and
writes the manifest. Which rank encodes a shard changes nothing in it: the output depends only on the input, the
checkpoint and the flags (tested byte for byte on the CPU at 1 and 2 ranks).

Tokens are the argmax of the encoder logits (no gumbel noise). Each sample: `KEY.tokens.npy` (h, w) int16,
`KEY.txt` (caption), `KEY.json` (the input's metadata + split, grid shape, vocab, views). Samples that cannot be used
(no or an undecodable image, no caption; in train also the data's filters: size, aspect ratio, caption length, as
training applies them) are skipped and counted by reason in the records and the manifest ("skipped"), with the
samples a cut or corrupt tar lost where a count says how many.

With augmentations K > 1, each train image is encoded K times and stored as (K, h, w) int16: index 0 the central
view (the K = 1 encoding), indices 1..K-1 Listing 2 draws (prior_augment) from a generator seeded by (seed, split,
shard name), so the set is reproducible; train_tokens picks one of the K per sample. Evaluation splits keep the
single central view as (h, w). An image that gives Listing 2 no room (smaller than the dVAE's side, or exactly
that square) repeats its central view K times; such images are counted ("central_only").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadalle.config import Data
from megadalle.data.images import check_shape, decode_image, image_member
from megadalle.data.loader import caption_of, collate, data_splits, read_shard, s3_settings, sample_meta, split_source
from megadalle.data.s3 import S3Settings, put_object, read_object
from megadalle.data.shards import FORMAT, MANIFEST, expected_samples, sha256_file, shard_records
from megadalle.data.transforms import center_resize, prior_augment, to_tensor
from megadalle.models.dvae_loss import map_pixels

RECORD = ".record.json"


def views(img: np.ndarray, size: int, k: int, rng: random.Random, central_only: list[int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (k, 3, size, size) in [0, 1]: the central view, then k - 1 Listing 2 draws; k copies
    of the central view where Listing 2 has no room (counted in central_only[0])."""
    central = center_resize(img, size)
    if min(img.shape[:2]) < size or img.shape[:2] == (size, size):
        central_only[0] += 1
        return to_tensor(central).expand(k, -1, -1, -1)  # (k, 3, size, size)
    return torch.stack([to_tensor(central)] + [to_tensor(prior_augment(img, size, rng)) for _ in range(k - 1)])


@dataclass(frozen=True)
class Job:
    """One input shard to encode into `<out>/<split>/<name>.tar`."""

    split: str
    url: str
    name: str
    known: int
    """The input's sample count from its manifest record (0: none; its _stats.json is read when it is encoded)."""


def jobs_of(data: Data) -> list[Job]:
    """Every input shard of every split of `data`, in order; output names are the input names (without `.tar`),
    which must be unique within a split."""
    settings, jobs = s3_settings(data), []
    for split in data_splits(data):
        source = split_source(data, split)
        if source is None:
            continue
        seen: dict[str, str] = {}
        for url, record in shard_records(source, split, settings):
            name = url.rsplit("/", 1)[-1].removesuffix(".tar")
            if name in seen:
                raise ValueError(f"{split}: shards {seen[name]} and {url} have the same name; token shards are "
                                 f"named after their input shards")  # fmt: skip
            seen[name] = url
            jobs.append(Job(split, url, name, int(record.get("samples", 0))))
    return jobs


def fingerprint(step_folder: Path, augmentations: int, seed: int, data: Data) -> str:
    """What a token shard depends on besides its input: the checkpoint (every file's name, size and mtime: a
    retrained or copied one is another), the views and the filters. A record with another fingerprint is stale."""
    h = hashlib.sha256(f"{augmentations}/{seed}/{data.image_keys}/{data.caption_key}/{data.min_image_side}/"
                       f"{data.max_aspect_ratio}/{data.max_caption_chars}".encode())  # fmt: skip
    files = sorted(step_folder.rglob("*")) if step_folder.is_dir() else [step_folder]
    for file in files:
        if file.is_file():
            st = file.stat()
            h.update(f"{file.relative_to(step_folder.parent)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class Output:
    """The token set's folder: local, or s3://bucket/prefix/ (files are written locally, then uploaded)."""

    def __init__(self, root: str, settings: S3Settings) -> None:
        self.root, self.settings = root.rstrip("/"), settings
        self.remote = root.startswith("s3://")
        if not self.remote:
            Path(root).mkdir(parents=True, exist_ok=True)

    def url(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> bytes | None:
        return read_object(self.url(rel), self.settings)

    def scratch(self, rel: str) -> Path:
        """A temporary local file for `rel`: beside its destination when local (so that the rename is atomic), after
        removing what a killed run left there; in the temporary folder for S3."""
        if self.remote:
            fd, name = tempfile.mkstemp(prefix="megadalle-encode-", suffix=".tmp")
            os.close(fd)
            return Path(name)
        dest = Path(self.url(rel))
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(dest.name + ".tmp*"):
            stale.unlink(missing_ok=True)
        return dest.with_name(dest.name + f".tmp{os.getpid()}")

    def put(self, rel: str, local: Path) -> None:
        """`local` becomes `rel`: renamed in place (atomic), or uploaded (an S3 object appears whole or not at all)."""
        if not self.remote:
            os.replace(local, self.url(rel))
            return
        try:
            put_object(self.url(rel), local, self.settings)
        finally:
            local.unlink(missing_ok=True)


@torch.no_grad()
def encode_one(model: torch.nn.Module, data: Data, job: Job, out: Output, batch: int, k: int, seed: int,
               device: torch.device, stamp: str) -> dict[str, Any]:  # fmt: skip
    """Encode one input shard into its token shard and write the shard, then its record; returns the record."""
    import webdataset as wds

    a, settings = model.args, s3_settings(data)
    rel = f"{job.split}/{job.name}.tar"
    known = job.known or expected_samples(job.url, settings) or 0
    rng, central_only, skips = random.Random(f"{seed}/{job.split}/{job.name}"), [0], Counter()
    train = job.split == "train"

    def item(sample: dict) -> tuple[torch.Tensor, str, dict]:
        caption = caption_of(sample, data.max_caption_chars if train else sys.maxsize, data.caption_key)
        img = decode_image(image_member(sample, data.image_keys))  # (H, W, 3) uint8
        if train:
            check_shape(img, data.min_image_side, data.max_aspect_ratio)
        x = views(img, a.image_size, k, rng, central_only) if k > 1 else to_tensor(center_resize(img, a.image_size))
        return x, caption, dict(sample_meta(sample), key=sample["__key__"])

    scratch = out.scratch(rel)
    count = 0
    with wds.TarWriter(str(scratch), mtime=0.0) as writer:  # mtime fixed: the same bytes from every run
        items = read_shard(job.url, item, skips, known, settings)
        while chunk := [x for _, x in zip(range(batch), items)]:
            images, captions, metas = collate(chunk)
            images = images.to(device)
            if k == 1:
                codes = model.encode_codes(map_pixels(images))  # (B, h, w)
            else:  # the central views alone, as with K = 1, so that index 0 is the K = 1 encoding bit for bit
                first = model.encode_codes(map_pixels(images[:, 0]))  # (B, h, w)
                rest = model.encode_codes(map_pixels(images[:, 1:].flatten(0, 1)))  # (B*(K-1), h, w)
                rest = rest.view(len(captions), k - 1, a.grid_size, a.grid_size)  # (B, K-1, h, w)
                codes = torch.cat([first[:, None], rest], dim=1)  # (B, K, h, w)
            for code, caption, meta in zip(codes.to(torch.int16).cpu().numpy(), captions, metas):
                meta = dict(meta, split=job.split, grid=[a.grid_size, a.grid_size], vocab_size=a.vocab_size,
                            augmentations=k)  # fmt: skip
                writer.write({"__key__": meta["key"], "tokens.npy": code, "txt": caption, "json": meta})
                count += 1
    record = {"path": rel, "samples": count, "bytes": scratch.stat().st_size, "sha256": sha256_file(scratch),
              "source": job.url, "skipped": dict(skips), "central_only": central_only[0],
              "fingerprint": stamp}  # fmt: skip
    out.put(rel, scratch)
    side = out.scratch(rel.removesuffix(".tar") + RECORD)
    side.write_text(json.dumps(record) + "\n")
    out.put(rel.removesuffix(".tar") + RECORD, side)
    return record


def write_manifest(jobs: list[Job], output: Output, stamp: str, about: dict[str, Any], splits_of: list[str],
                   readers: int = 32) -> dict[str, Any]:  # fmt: skip
    """The token set's manifest from the shards' records, in input order (`readers` parallel reads), after checking
    that every record is there with this run's fingerprint; `about`: the manifest's other fields."""
    with ThreadPoolExecutor(readers) as pool:
        raws = list(pool.map(lambda j: output.read(f"{j.split}/{j.name}{RECORD}"), jobs))
    missing = [f"{j.split}/{j.name}" for j, raw in zip(jobs, raws) if raw is None]
    records = [json.loads(raw) for raw in raws if raw is not None]
    stale = [r["path"] for r in records if r.get("fingerprint") != stamp]
    if missing or stale:
        raise RuntimeError(f"{len(missing)} token shards have no record {missing[:3]} and {len(stale)} one from "
                           f"another checkpoint or flags {stale[:3]}: rerun to encode them")  # fmt: skip
    splits: dict[str, dict[str, Any]] = {split: {"samples": 0, "shards": []} for split in splits_of}
    skipped: Counter = Counter()
    for job, rec in zip(jobs, records):
        splits[job.split]["samples"] += rec["samples"]
        splits[job.split]["shards"].append(rec)
        skipped.update(rec["skipped"])
    manifest = {"format": FORMAT, "content": "tokens", "created_by": "tools/encode_shards.py", **about,
                "central_only": sum(r["central_only"] for r in records),
                "samples": sum(s["samples"] for s in splits.values()),
                "skipped": {"total": sum(skipped.values()), "by_reason": dict(sorted(skipped.items()))},
                "splits": splits}  # fmt: skip
    scratch = output.scratch(MANIFEST)
    scratch.write_text(json.dumps(manifest, indent=1) + "\n")
    output.put(MANIFEST, scratch)
    return manifest


def encode_shards(
    checkpoint: str,
    out: str,
    data: Data | None = None,
    batch: int = 64,
    augmentations: int = 1,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any] | None:
    """Encode this rank's share of the input shards (see the module docstring); collective over the process group
    when there is one. Rank 0 returns the token set's manifest, other ranks None. `data`: the checkpoint config's
    [data] section by default. A rank that fails makes every rank raise, after the others finished their shards."""
    from megadalle.engine import distributed
    from megadalle.engine.checkpoint import open_eval_weights
    from megadalle.stages.load import load_trained, resolve_device

    if augmentations < 1:
        raise ValueError(f"augmentations must be at least 1, got {augmentations}")
    rank, world = distributed.rank(), distributed.world_size()
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # the same codes every run
    dev = resolve_device(device)

    def plan() -> tuple[Path, list[Job], str, Data]:
        weights = open_eval_weights(checkpoint)  # a run's checkpoints/ folder: its newest step, chosen once
        d = data or weights.cfg.data
        return weights.source, jobs_of(d), fingerprint(weights.source, augmentations, seed, d), d

    folder, jobs, stamp, data = distributed.from_main(plan)
    model, _ = load_trained(folder, "dvae", dev)
    output = Output(out, s3_settings(data))
    t0, before, images, failure = time.monotonic(), 0, 0, None
    mine = [job for i, job in enumerate(jobs) if i % world == rank]
    try:
        for job in mine:
            raw = output.read(f"{job.split}/{job.name}{RECORD}")
            if raw is not None and json.loads(raw).get("fingerprint") == stamp and json.loads(raw)["source"] == job.url:
                before += 1
                continue
            s = time.monotonic()
            k = augmentations if job.split == "train" else 1
            rec = encode_one(model, data, job, output, batch, k, seed, dev, stamp)
            images += rec["samples"]
            said = f", {sum(rec['skipped'].values())} skipped {rec['skipped']}" if rec["skipped"] else ""
            print(f"encode_shards: rank {rank}: {output.url(rec['path'])}: {rec['samples']} images{said} in "
                  f"{time.monotonic() - s:.1f} s", flush=True)  # fmt: skip
    except Exception as e:  # the others finish their shards; every rank then stops (below), this one with e
        failure = e
    seconds = time.monotonic() - t0
    print(f"encode_shards: rank {rank}: {len(mine) - before} shards, {images} images in {seconds:.2f} s "
          f"({images / max(seconds, 1e-9):.1f} images/s); {before} were done before", flush=True)  # fmt: skip
    failed = distributed.sum_over_ranks({"failed": float(failure is not None)})["failed"]  # also the barrier
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"{int(failed)} of {world} ranks failed (their errors are in their output); rerun to "
                           f"encode what they did not")  # fmt: skip
    if rank != 0:
        return None
    a = model.args
    about = {"dvae_checkpoint": str(folder), "grid": [a.grid_size, a.grid_size], "vocab_size": a.vocab_size,
             "augmentations": augmentations, "augment_seed": seed, "image_shards": data.shards,
             "val_image_shards": data.val_shards, "fingerprint": stamp}  # fmt: skip
    return write_manifest(jobs, output, stamp, about, data_splits(data))
