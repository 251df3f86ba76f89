#!/usr/bin/env python
"""Write a megadalle manifest (counts, sizes, sha256) for shards that have none, as img2dataset writes them.

    python tools/index_shards.py --train SOURCE [--val SOURCE] --out DIR [--workers 4] [--state FILE]
    python tools/index_shards.py --train s3://BUCKET/cc3m/ --out s3://BUCKET/cc3m/ [--s3-endpoint URL]

SOURCE: any shard source (megadalle/data/s3.py list_shards): a folder or s3://bucket/prefix/ of .tar files, a brace
pattern, one .tar, or a .txt list of shard URLs. DIR (a folder or s3://bucket/prefix/) receives manifest.json, whose
shard paths are whole URLs or absolute paths: `--data.shards=DIR` then reads the shards where they are, and
`--data.verify_sha256=true` checks them. Each shard is read once, hashed on the way and its samples counted as
training reads them ("read"); "samples" is img2dataset's count (NNNNN_stats.json beside the tar) where there is one,
else what the tar holds. A shard holding fewer, or corrupt tar data, is marked "damaged" and listed at the end.
Resumable: each finished shard is appended to DIR/manifest.json.partial (for an s3:// DIR, to --state, default
./index_shards.<hash of DIR>.partial); a rerun skips the shards listed there. The zeroshot split is empty.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from megadalle.data.s3 import S3Error, S3Settings, client, list_shards, read_hashed, samples
from megadalle.data.shards import FORMAT, MANIFEST, expected_samples, write_json_atomic


def index_shard(url: str, settings: S3Settings) -> dict[str, Any]:
    """One shard's manifest record: "path" (the URL), "samples", "read", "bytes", "sha256", and "damaged" (why)
    where the tar holds fewer samples than its count or corrupt data. An unreadable object raises S3Error."""
    f, sha256, size = read_hashed(url, settings)
    broken: list[str] = []

    def handler(exn: Exception) -> bool:  # as training reads: corrupt tar data is read past, and counted
        if isinstance(exn, S3Error):
            raise exn
        broken.append(type(exn).__name__)
        return True

    with f:
        read = sum(1 for _ in samples([url], settings, handler=handler, opener=lambda _: f))
    expected = expected_samples(url, settings)
    record: dict[str, Any] = {"path": url, "samples": read if expected is None else expected, "read": read,
                              "bytes": size, "sha256": sha256}  # fmt: skip
    if broken or read < record["samples"]:
        why = f"corrupt tar ({broken[0]})" if broken else "tar ended early"
        record["damaged"] = f"{why}: {read} of {record['samples']} samples read"
    return record


def _shard_url(url: str) -> str:
    """An s3:// URL as it is; a local shard as an absolute path, which must exist."""
    if url.startswith("s3://"):
        return url
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"{url}: only s3:// and local shards can be read")
    path = os.path.abspath(url.removeprefix("file://"))
    if not Path(path).is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    return path


def _load_partial(path: Path) -> dict[str, dict[str, Any]]:
    """url -> record of the shards a previous run finished (a line cut by a crash: that shard is indexed again)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    text = path.read_text()
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            record = json.loads(line)
            done[record["path"]] = record
    if text and not text.endswith("\n"):
        with open(path, "a") as f:
            f.write("\n")
    return done


def _write_manifest(out: str, manifest: dict[str, Any], settings: S3Settings) -> None:
    if not out.startswith("s3://"):
        write_json_atomic(Path(out) / MANIFEST, manifest)
        return
    u = urlparse(out.rstrip("/") + "/")
    key = u.path.lstrip("/") + MANIFEST
    try:
        client(settings).put_object(Bucket=u.netloc, Key=key, Body=json.dumps(manifest, indent=1).encode() + b"\n",
                                    ContentType="application/json")  # fmt: skip
    except Exception as e:
        code = getattr(e, "response", {}).get("Error", {}).get("Code") or type(e).__name__
        where = f"endpoint {settings.endpoint or 'AWS default'}"
        raise S3Error(f"cannot write s3://{u.netloc}/{key} ({where}): {code}") from None


def index(a: argparse.Namespace) -> int:
    t0 = time.time()
    settings = S3Settings(endpoint_url=a.s3_endpoint or None)
    sources = {split: src for split, src in (("train", a.train), ("val", a.val)) if src}
    urls: dict[str, list[str]] = {}
    for split, src in sources.items():
        try:
            urls[split] = [_shard_url(u) for u in list_shards(src, settings)]
        except (OSError, ValueError, S3Error) as e:
            raise ValueError(f"--{split} {src}: {e}") from None
    if not a.out.startswith("s3://"):
        Path(a.out).mkdir(parents=True, exist_ok=True)
    state = Path(a.state) if a.state else (Path(a.out) / (MANIFEST + ".partial"))
    if not a.state and a.out.startswith("s3://"):
        state = Path(f"index_shards.{hashlib.sha256(a.out.encode()).hexdigest()[:12]}.partial")
    done = _load_partial(state)
    every = list(dict.fromkeys(u for split in urls.values() for u in split))  # a shard in two sources: read once
    todo = [u for u in every if u not in done]
    if len(todo) < len(every):
        print(f"skipping {len(every) - len(todo)} already indexed ({state})")
    state.parent.mkdir(parents=True, exist_ok=True)
    workers = min(a.workers, len(todo))
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext()
    with open(state, "a") as log, pool:
        work = partial(index_shard, settings=settings)
        for record in pool.imap_unordered(work, todo) if workers > 1 else map(work, todo):
            log.write(json.dumps(record) + "\n")
            log.flush()
            os.fsync(log.fileno())
            done[record["path"]] = record
    splits: dict[str, Any] = {split: {"samples": sum(done[u]["samples"] for u in us), "shards": [done[u] for u in us]}
                              for split, us in urls.items()}  # fmt: skip
    splits["zeroshot"] = {"samples": 0, "shards": []}  # readers evaluate it when a set has one; this has none
    damaged = [done[u] for u in every if "damaged" in done[u]]
    manifest = {"format": FORMAT, "created_by": "tools/index_shards.py", "sources": sources,
                "samples": sum(s["samples"] for s in splits.values()), "splits": splits, "damaged": len(damaged),
                "seconds": round(time.time() - t0, 2)}  # fmt: skip
    _write_manifest(a.out, manifest, settings)
    state.unlink(missing_ok=True)
    for record in damaged:
        print(f"damaged: {record['path']}: {record['damaged']}")
    read, size = sum(done[u]["read"] for u in every), sum(done[u]["bytes"] for u in every)
    print(f"indexed {len(every)} shards ({len(todo)} read now): {manifest['samples']} samples, {read} read, "
          f"{size} bytes, {time.time() - t0:.1f} s; {len(damaged)} damaged")  # fmt: skip
    print(f"manifest: {a.out.rstrip('/')}/{MANIFEST}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="the train split's shards (any shard source)")
    ap.add_argument("--val", default=None, help="the val split's shards (any shard source)")
    ap.add_argument("--out", required=True, help="folder or s3://bucket/prefix/ for manifest.json")
    ap.add_argument("--workers", type=int, default=4, help="processes reading shards")
    ap.add_argument("--state", default=None, help="the file of finished shards (default: see above)")
    ap.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error(f"--workers must be >= 1, got {a.workers}")
    try:
        return index(a)
    except (OSError, ValueError, S3Error) as e:
        print(f"index_shards: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
