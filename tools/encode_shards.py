#!/usr/bin/env python
"""Encode image shards into token shards for stage 2 with a trained dVAE's EMA weights, on one process or many.

    python tools/encode_shards.py --checkpoint outputs/dvae_small/checkpoints/step_00000400 \
        [--shards outputs/demo/shards] [--val-shards SOURCE] [--out outputs/demo/tokens] [--batch 64] \
        [--augmentations K] [--seed 0] [--device auto]
    torchrun --nproc_per_node=8 tools/encode_shards.py --checkpoint ... --out s3://bucket/tokens/
    srun --ntasks=64 python tools/encode_shards.py --checkpoint ... --out s3://bucket/tokens/

The image data is the checkpoint config's [data] section (its shards, val_shards, image_keys, caption_key and
filters), with --shards / --val-shards in place of its sources and any `--data.key=value` overrides: a shard set
with a manifest, or img2dataset's output (data/loader.py's split_source). Each input shard becomes one token shard
named after it, `<out>/<split>/<input name>.tar`, local or s3://; input shard i of the job's list is encoded by rank
i % world. A shard is written under a temporary name and renamed (uploaded) when complete, then its record `<input
name>.record.json` is written beside it: a rerun or a requeued job skips every shard that has its record (from the
same checkpoint and flags) and redoes the others. When every rank is done, rank 0 writes the token set's manifest
from the records, in input order. The output depends only on the input and the flags, not on the number of ranks
(tested byte for byte).

Tokens are the argmax of the encoder logits (no gumbel noise). Each sample: `KEY.tokens.npy` (h, w) int16, `KEY.txt`
(caption), `KEY.json` (the input's metadata + split, grid shape, vocab, views). Samples that cannot be used (no or
an undecodable image, no caption, and in train the data's size and aspect filters) are skipped and counted by reason
in the records and the manifest ("skipped"), with the samples a cut or corrupt tar lost where a count says how many.

With --augmentations K > 1, each TRAIN image is encoded K times and stored as (K, h, w) int16: index 0 the
central view (the K = 1 encoding), indices 1..K-1 Listing 2 draws (prior_augment) from a generator seeded by
(--seed, split, shard name), so the set is reproducible; train_tokens picks one of the K per sample. Evaluation
splits (val, zeroshot) always keep the single central view as (h, w), whatever K. An image that gives Listing 2 no
room (smaller than the dVAE's side, or exactly that square) repeats its central view K times; such images are
counted, printed and recorded in the manifest ("central_only"). Image shards made at the dVAE's own side leave
no room at all: make them larger (the paper's Listing 2 resizes to up to 9/8 of the target).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadalle.config import ConfigError, Data, apply_overrides
from megadalle.data.images import check_shape, decode_image, image_member
from megadalle.data.loader import _caption, _collate, data_splits, read_shard, s3_settings, split_source
from megadalle.data.s3 import S3Error, S3Settings, client, read_object
from megadalle.data.shards import FORMAT, MANIFEST, expected_samples, sha256_file, shard_records
from megadalle.data.transforms import center_resize, prior_augment, to_tensor
from megadalle.engine.checkpoint import open_eval_weights
from megadalle.engine.denormals import flush_denormals
from megadalle.models.dvae_loss import map_pixels
from megadalle.stages.load import load_trained, resolve_device

RECORD = ".record.json"


def views(img: np.ndarray, size: int, k: int, rng: random.Random, central_only: list[int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (k, 3, size, size) in [0, 1]: the central view, then k - 1 Listing 2 draws; k copies
    of the central view where Listing 2 has no room (counted in central_only[0])."""
    central = center_resize(img, size)
    if min(img.shape[:2]) < size or img.shape[:2] == (size, size):
        central_only[0] += 1
        return to_tensor(central).expand(k, -1, -1, -1)  # (k, 3, size, size)
    return torch.stack([to_tensor(central)] + [to_tensor(prior_augment(img, size, rng)) for _ in range(k - 1)])


@dataclasses.dataclass(frozen=True)
class Job:
    """One input shard to encode into `<out>/<split>/<name>.tar`."""

    split: str
    url: str
    name: str
    known: int  # the input's expected sample count (manifest record or _stats.json), 0: unknown


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

    def put(self, rel: str, local: Path) -> None:
        """`local` becomes `rel`: renamed in place (atomic), or uploaded (an S3 object appears whole or not at all)."""
        if not self.remote:
            dest = Path(self.url(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, dest)
            return
        bucket, key = self.url(rel)[len("s3://") :].split("/", 1)
        try:
            client(self.settings).upload_file(str(local), bucket, key)
        except Exception as e:
            raise S3Error(f"cannot upload {self.url(rel)}: {type(e).__name__}: {e}") from None
        finally:
            local.unlink(missing_ok=True)

    def clear_scratch(self, rel: str) -> None:
        """Remove what a killed run left of `rel` (its temporary files; an S3 upload leaves nothing)."""
        if not self.remote:
            for path in Path(self.url(rel)).parent.glob(Path(rel).name + ".tmp*"):
                path.unlink(missing_ok=True)

    def scratch(self, rel: str) -> Path:
        """A temporary local path for `rel`, on the same file system as its destination when local."""
        if self.remote:
            fd, name = tempfile.mkstemp(suffix=".tmp")
            os.close(fd)
            return Path(name)
        path = Path(self.url(rel) + f".tmp{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@torch.no_grad()
def encode_one(model: torch.nn.Module, data: Data, job: Job, out: Output, batch: int, k: int, seed: int,
               device: torch.device, settings: S3Settings, stamp: str) -> dict[str, Any]:  # fmt: skip
    """Encode one input shard into its token shard and write the shard, then its record; returns the record."""
    import webdataset as wds

    a = model.args
    rel = f"{job.split}/{job.name}.tar"
    known = job.known or expected_samples(job.url, settings) or 0
    rng, central_only, skips = random.Random(f"{seed}/{job.split}/{job.name}"), [0], Counter()

    def item(sample: dict) -> tuple[torch.Tensor, str, dict]:
        caption = _caption(sample, sys.maxsize, data.caption_key)
        img = decode_image(image_member(sample, data.image_keys))  # (H, W, 3) uint8
        if job.split == "train":
            check_shape(img, data.min_image_side, data.max_aspect_ratio)
        x = views(img, a.image_size, k, rng, central_only) if k > 1 else to_tensor(center_resize(img, a.image_size))
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:
            meta = {}
        return x, caption, dict(meta if isinstance(meta, dict) else {}, key=sample["__key__"])

    out.clear_scratch(rel)  # a killed run's partial shard
    scratch = out.scratch(rel)
    count = 0
    with wds.TarWriter(str(scratch), mtime=0.0) as writer:  # mtime fixed: the same bytes from every run
        items = read_shard(job.url, item, skips, known, settings)
        while chunk := [x for _, x in zip(range(batch), items)]:
            images, captions, metas = _collate(chunk)
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


def rendezvous() -> tuple[int, int]:
    """(rank, world) of a torchrun / srun / mpirun launch, with a process group for the final barrier; (0, 1) for
    a plain run."""
    sizes = [os.environ.get(v) for v in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")]
    if not any(s and int(s) > 1 for s in sizes):
        return 0, 1
    from megadalle.engine.distributed import init_distributed

    return init_distributed(collective_timeout_s=7 * 24 * 3600.0)  # the barrier waits for the slowest rank


def fingerprint(checkpoint: str, augmentations: int, seed: int, data: Data) -> str:
    """What a token shard depends on besides its input: the dVAE checkpoint (its config and every file's size and
    mtime), the views and the filters. A record with another fingerprint is stale: its shard is encoded again."""
    h = hashlib.sha256(f"{augmentations}/{seed}/{data.image_keys}/{data.caption_key}/{data.min_image_side}/"
                       f"{data.max_aspect_ratio}".encode())  # fmt: skip
    path = Path(checkpoint)
    folder = path.parent if path.name == "extra.pt" else path  # a checkpoint's files, or an exported file
    for file in sorted(folder.rglob("*")) if folder.is_dir() else [folder]:
        if file.is_file():
            st, name = file.stat(), file.relative_to(folder) if folder.is_dir() else file.name
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def encode_shards(
    checkpoint: str,
    out: str,
    data: Data | None = None,
    batch: int = 64,
    augmentations: int = 1,
    seed: int = 0,
    device: str = "auto",
    rank: int = 0,
    world: int = 1,
) -> dict | None:
    """Encode this rank's share of the input shards (see the module docstring), wait for every rank, and on rank 0
    write and return the token set's manifest (None on other ranks). `data`: the checkpoint config's [data]."""
    if augmentations < 1:
        raise ValueError(f"--augmentations must be at least 1, got {augmentations}")
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    dev = resolve_device(device)
    model, cfg = load_trained(checkpoint, "dvae", dev)
    data = data or cfg.data
    settings = s3_settings(data)
    jobs, output = jobs_of(data), Output(out, settings)
    stamp = fingerprint(checkpoint, augmentations, seed, data)
    t0, before, images = time.time(), 0, 0
    mine = [job for i, job in enumerate(jobs) if i % world == rank]
    for job in mine:
        raw = output.read(f"{job.split}/{job.name}{RECORD}")
        if raw is not None and json.loads(raw).get("fingerprint") == stamp and json.loads(raw)["source"] == job.url:
            before += 1
            continue
        s = time.time()
        k = augmentations if job.split == "train" else 1
        rec = encode_one(model, data, job, output, batch, k, seed, dev, settings, stamp)
        images += rec["samples"]
        skipped = f", {sum(rec['skipped'].values())} skipped {rec['skipped']}" if rec["skipped"] else ""
        print(f"encode_shards: rank {rank}: {output.url(rec['path'])}: {rec['samples']} images{skipped} in "
              f"{time.time() - s:.1f} s", flush=True)  # fmt: skip
    seconds = time.time() - t0
    print(f"encode_shards: rank {rank}: {len(mine) - before} shards, {images} images in {seconds:.2f} s "
          f"({images / max(seconds, 1e-9):.1f} images/s); {before} were done before", flush=True)  # fmt: skip
    if world > 1:
        from megadalle.engine.distributed import barrier

        barrier()
    if rank != 0:
        return None
    m = write_manifest(checkpoint, jobs, output, augmentations, seed, data, model.args)
    if augmentations > 1 and m["central_only"]:
        print(f"encode_shards: warning: {m['central_only']} train images leave Listing 2 no room at "
              f"{model.args.image_size}px (smaller, or exactly that square): their {augmentations} views repeat "
              f"the central view", file=sys.stderr)  # fmt: skip
    return m


def write_manifest(checkpoint: str, jobs: list[Job], output: Output, augmentations: int, seed: int, data: Data,
                   model_args: Any) -> dict[str, Any]:  # fmt: skip
    """Rank 0, after every rank is done: the token set's manifest from the shards' records, in input order."""
    splits: dict[str, dict[str, Any]] = {}
    missing = []
    skipped: Counter = Counter()
    central_only = 0
    for job in jobs:
        raw = output.read(f"{job.split}/{job.name}{RECORD}")
        if raw is None:
            missing.append(f"{job.split}/{job.name}")
            continue
        rec = json.loads(raw)
        split = splits.setdefault(job.split, {"samples": 0, "shards": []})
        split["samples"] += rec["samples"]
        split["shards"].append(rec)
        skipped.update(rec["skipped"])
        central_only += rec["central_only"]
    if missing:
        raise RuntimeError(f"{len(missing)} token shards have no record (a rank failed): {missing[:5]}; rerun to "
                           f"encode them")  # fmt: skip
    for split in data_splits(data):  # a split with no shards is still a split of the set (zeroshot may be empty)
        splits.setdefault(split, {"samples": 0, "shards": []})
    manifest = {
        "format": FORMAT,
        "content": "tokens",
        "created_by": "tools/encode_shards.py",
        "dvae_checkpoint": str(checkpoint),
        "grid": [model_args.grid_size, model_args.grid_size],
        "vocab_size": model_args.vocab_size,
        "augmentations": augmentations,
        "augment_seed": seed,
        "central_only": central_only,
        "image_shards": data.shards,
        "val_image_shards": data.val_shards,
        "samples": sum(s["samples"] for s in splits.values()),
        "skipped": {"total": sum(skipped.values()), "by_reason": dict(sorted(skipped.items()))},
        "splits": splits,
    }
    scratch = output.scratch(MANIFEST)
    scratch.write_text(json.dumps(manifest, indent=1) + "\n")
    output.put(MANIFEST, scratch)
    return manifest


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # before the first torch operation starts the thread pool
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or its extra.pt) with EMA weights")
    p.add_argument("--shards", default=None, help="image data (default: the checkpoint config's data.shards)")
    p.add_argument("--val-shards", default=None, help="validation image data (default: its data.val_shards)")
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix/ for the token shard set")
    p.add_argument("--batch", type=int, default=64, help="images per encoder call (times K for train views)")
    p.add_argument("--augmentations", type=int, default=1, help="views per train image: central + K-1 Listing 2")
    p.add_argument("--seed", type=int, default=0, help="seed of the Listing 2 draws")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU when there is one), cpu, cuda:N")
    args, overrides = p.parse_known_args(argv)
    world = 1
    try:
        cfg = open_eval_weights(args.checkpoint).cfg  # the config only: the weights load on the device
        apply_overrides(cfg, overrides, ("data",))
        val = cfg.data.val_shards if args.val_shards is None else args.val_shards
        data = dataclasses.replace(cfg.data, shards=args.shards or cfg.data.shards, val_shards=val)
        rank, world = rendezvous()
        t0 = time.time()
        m = encode_shards(args.checkpoint, args.out, data, args.batch, args.augmentations, args.seed, args.device,
                          rank, world)  # fmt: skip
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError, S3Error) as e:
        print(f"encode_shards: error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            from megadalle.engine.distributed import shutdown

            shutdown(barrier=False)
    if m is not None:
        said = f", {m['skipped']['total']} skipped {m['skipped']['by_reason']}" if m["skipped"]["total"] else ""
        print(f"encoded {m['samples']} images into {m['grid'][0]}x{m['grid'][1]} grids of {m['vocab_size']} codes"
              f"{said} on {world} ranks in {time.time() - t0:.1f} s -> {args.out.rstrip('/')}/{MANIFEST}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
