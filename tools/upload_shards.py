#!/usr/bin/env python
"""Upload a shard set to S3 and check it there.

    python tools/upload_shards.py outputs/demo/shards s3://BUCKET/PREFIX/ [--endpoint URL] [--part-mb 64] [--verify]

Shards first (multipart above --part-mb), the manifest last, so readers never see a manifest whose shards are
missing; each object's size is checked against the manifest, and with --verify every shard is read back and its
sha256 compared. Credentials: boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, ...);
endpoint: --endpoint or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import argparse
import sys

from megadalle.data.s3 import S3Error, S3Settings, upload_shard_set, verify_remote


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="local shard set (its manifest.json)")
    ap.add_argument("url", help="s3://bucket/prefix/")
    ap.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    ap.add_argument("--part-mb", type=int, default=64, help="multipart part size and threshold")
    ap.add_argument("--verify", action="store_true", help="read every shard back and compare its sha256")
    a = ap.parse_args(argv)
    settings = S3Settings(endpoint_url=a.endpoint)
    try:
        manifest = upload_shard_set(a.root, a.url, settings, a.part_mb)
        shards = sum(len(s["shards"]) for s in manifest["splits"].values())
        print(f"uploaded {shards} shards and the manifest to {a.url}")
        if a.verify:
            print(f"verified {verify_remote(a.url, settings)} samples: every sha256 matches the manifest")
    except (S3Error, FileNotFoundError, ValueError) as e:
        print(f"upload_shards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
