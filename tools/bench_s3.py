#!/usr/bin/env python
"""Training batches streamed from S3 against the same shards read from local disk, and against what a training
step consumes (issue 13's benchmark). A real SeaweedFS server holds the shards (tests/s3server.py): on loopback,
or with --link behind a shaped link (tools/slow_link.py: the server in one network namespace, the reader in the
other; needs root), as a remote object store is.

    python tools/bench_s3.py [--shards outputs/demo/tokens] [--run outputs/prior_small] [--workers 2]
                             [--link 200mbit]

Every pass is the real training stream (data/loader.py -> data/stream.py): --epochs epochs of the train split
for one rank with --workers DataLoader workers, each sample decoded (code grids, or PNGs augmented by Listing 1)
and batched. Passes: local disk; S3 streamed as read (data.read_ahead = 0, the default); S3 with each next shard
fetched whole in the background (read_ahead = 1). Reported per pass: samples/s and the seconds to the first batch.
The consumption rate comes from a run's metrics (--run: its median images_per_s). One JSON object; read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def rate(root: str, workers: int, epochs: int, read_ahead: int, batch: int, image_size: int) -> dict[str, float]:
    """Samples/s and seconds to the first batch of `epochs` epochs of the training stream over `root`."""
    from megadalle.config import Data
    from megadalle.data.loader import SkipCounter, train_images, train_tokens
    from megadalle.data.shards import read_any_manifest

    data = Data(shards=root, num_workers=workers, read_ahead=read_ahead, shuffle_buffer=256)
    tokens = read_any_manifest(root).get("content") == "tokens"
    args = (batch, 0, 0, SkipCounter())
    stream = train_tokens(data, root, *args, world=1) if tokens else train_images(data, image_size, *args, world=1)
    stream.max_epochs = epochs
    n, first, t0 = 0, None, time.perf_counter()
    for codes_or_images, _captions in stream:
        n += len(codes_or_images)
        first = first if first is not None else time.perf_counter() - t0
    return {"samples_per_s": n / (time.perf_counter() - t0), "first_batch_s": first or 0.0, "samples": n}


def consumption(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [r["images_per_s"] for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]
    return statistics.median(rates) if rates else None


def measure(a: argparse.Namespace, host: str, wrap: list[str]) -> dict:
    """Start the server (at `host`, its command prefixed by `wrap`), upload, and time the three passes."""
    from megadalle.data import s3 as s3mod
    from tests.s3server import BUCKET, SeaweedS3

    root = str((REPO / a.shards).resolve())
    kw = dict(workers=a.workers, epochs=a.epochs, batch=a.batch, image_size=a.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedS3(Path(tmp), host=host, wrap=wrap).start()
        try:
            os.environ.update(server.env())
            s3mod._client.cache_clear()
            s3mod.upload_shard_set(root, f"s3://{BUCKET}/bench/")
            remote = f"s3://{BUCKET}/bench/"
            rate(remote, 0, 1, 0, a.batch, a.image_size)  # warm-up: the first connection, the server's caches
            return {"local": rate(root, read_ahead=0, **kw), "s3_streamed": rate(remote, read_ahead=0, **kw),
                    "s3_read_ahead": rate(remote, read_ahead=1, **kw)}  # fmt: skip
        finally:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="outputs/demo/tokens", help="a local shard set: token shards or images")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (data.num_workers)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="micro-batch size")
    ap.add_argument("--image-size", type=int, default=32, help="side of the training crops of image shards")
    ap.add_argument("--link", default="", help="tc rate of a link to the server, e.g. 200mbit (default: loopback)")
    ap.add_argument("--run", default="outputs/prior_small", help="a training run whose images_per_s is the need")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.link and not a.inner:  # run this script again inside namespace 0; the server goes to namespace 1
        import slow_link

        if not slow_link.available():
            print("--link needs root with ip and tc (network namespaces)", file=sys.stderr)
            return 2
        slow_link.link_up(a.link)
        try:
            argv_inner = [sys.executable, __file__, "--inner", *(argv if argv is not None else sys.argv[1:])]
            return subprocess.run(slow_link.in_ns(0, argv_inner), cwd=REPO).returncode
        finally:
            slow_link.link_down()
    if a.inner:
        import slow_link

        passes = measure(a, slow_link.ADDR[1], slow_link.in_ns(1, []))
    else:
        passes = measure(a, "127.0.0.1", [])
    result: dict = {"shards": a.shards, "workers": a.workers, "epochs": a.epochs, "link": a.link or "loopback",
                    **passes}  # fmt: skip
    local = passes["local"]["samples_per_s"]
    for name in ("s3_streamed", "s3_read_ahead"):
        result[f"{name}_over_local"] = passes[name]["samples_per_s"] / local
    need = consumption(REPO / a.run)
    if need:
        result["training_images_per_s"] = need
        for name in ("s3_streamed", "s3_read_ahead"):
            result[f"{name}_over_training"] = passes[name]["samples_per_s"] / need
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
