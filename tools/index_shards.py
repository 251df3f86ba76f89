#!/usr/bin/env python
"""Write a megadalle manifest (counts, sizes, sha256) for shards that have none, as img2dataset writes them.

    python tools/index_shards.py --train SOURCE [--val SOURCE] --out DIR [--workers 4] [--state FILE]
    python tools/index_shards.py --train s3://BUCKET/cc3m/ --out s3://BUCKET/cc3m/ [--s3-endpoint URL]

SOURCE: a folder or s3://bucket/prefix/ of .tar files, a brace pattern, one .tar, or a .txt list of shard URLs.
DIR (a folder or s3://bucket/prefix/) receives manifest.json, naming the shards where they are: `--data.shards=DIR`
reads them with exact skip accounting and `--data.verify_sha256=true` checks them. Shards whose tar holds fewer
samples than img2dataset wrote, or corrupt data, are listed at the end. Resumable (--state for an s3:// DIR). The
details: megadalle/data/shard_index.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from megadalle.data.s3 import S3Error, S3Settings
from megadalle.data.shard_index import index_shards
from megadalle.data.shards import MANIFEST


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="the train split's shards (any shard source)")
    ap.add_argument("--val", default=None, help="the val split's shards (any shard source)")
    ap.add_argument("--out", required=True, help="folder or s3://bucket/prefix/ for manifest.json")
    ap.add_argument("--workers", type=int, default=4, help="processes reading shards")
    ap.add_argument("--state", default=None, help="the file of finished shards (default: DIR/manifest.json.partial)")
    ap.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error(f"--workers must be >= 1, got {a.workers}")
    t0 = time.time()
    sources = {split: src for split, src in (("train", a.train), ("val", a.val)) if src}
    try:
        manifest, run = index_shards(sources, a.out, a.workers, a.state, S3Settings(endpoint_url=a.s3_endpoint or None))
    except (OSError, ValueError, S3Error) as e:
        print(f"index_shards: error: {e}", file=sys.stderr)
        return 2
    if run["before"]:
        print(f"skipping {run['before']} already indexed ({run['state']})")
    for record in run["damaged"]:
        print(f"damaged: {record['path']}: {record['damaged']}")
    shards, damaged = run["before"] + run["now"], len(run["damaged"])
    print(f"indexed {shards} shards ({run['now']} read now): {manifest['samples']} samples, {run['read']} read, "
          f"{run['bytes']} bytes, {time.time() - t0:.1f} s; {damaged} damaged")  # fmt: skip
    print(f"manifest: {a.out.rstrip('/')}/{MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
