#!/usr/bin/env python
"""Samples/s streamed from S3 against the same shards read from local disk, and against what a training step
consumes (issue 13's benchmark). A real SeaweedFS server on loopback holds the shards (tests/s3server.py).

    python tools/bench_s3.py [--shards outputs/demo/tokens] [--run outputs/prior_small] [--workers 2] [--decode]

Each reading pass is one epoch of the train split through `megadalle.data.s3.samples` in a DataLoader with
--workers worker processes (shards dealt by `epoch_shards`); --decode also decodes each sample's payload (code grid
or PNG), as training does.
The consumption rate comes from a run's metrics (--run outputs/prior_small: its median images_per_s).
Prints one JSON object; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _dataset(urls: list[str], epoch: int, decode: bool):
    import torch

    from megadalle.data.s3 import epoch_shards, samples

    class Epoch(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            worker, workers = (info.id, info.num_workers) if info else (0, 1)
            for s in samples(epoch_shards(urls, epoch, 0, 0, 1, worker, workers)):
                if decode and "png" in s:  # image shards: the PNG, as the dVAE stage decodes it
                    from PIL import Image

                    with Image.open(io.BytesIO(s["png"])) as im:
                        im.convert("RGB").load()
                elif decode:  # token shards: the code grids, as the prior stage reads them
                    import numpy as np

                    np.load(io.BytesIO(s["tokens.npy"]))
                yield 1

    return Epoch()


def rate(urls: list[str], workers: int, epochs: int, decode: bool) -> float:
    """Samples per second over `epochs` epochs."""
    import torch

    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        loader = torch.utils.data.DataLoader(_dataset(urls, epoch, decode), batch_size=None, num_workers=workers)
        n += sum(loader)
    return n / (time.perf_counter() - t0)


def consumption(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [r["images_per_s"] for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]
    return statistics.median(rates) if rates else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="outputs/demo/tokens",
                    help="a local shard set: the demo prior's token shards, or images")  # fmt: skip
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--decode", action="store_true", help="decode the PNGs as training does")
    ap.add_argument("--run", default="outputs/prior_small", help="a training run whose images_per_s is the need")
    a = ap.parse_args(argv)
    from megadalle.data import s3 as s3mod
    from megadalle.data.shards import split_urls
    from tests.s3server import BUCKET, SeaweedS3

    root = (REPO / a.shards).resolve()
    local = split_urls(root, "train")
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedS3(Path(tmp)).start()
        try:
            os.environ.update(server.env())
            s3mod._client.cache_clear()
            s3mod.upload_shard_set(root, f"s3://{BUCKET}/bench/")
            remote = s3mod.list_shards(f"s3://{BUCKET}/bench/train/")
            rate(remote[:1], 0, 1, False)  # warm-up: the first connection
            result = {"shards": len(local), "workers": a.workers, "epochs": a.epochs, "decode": a.decode,
                      "local_samples_per_s": rate(local, a.workers, a.epochs, a.decode),
                      "s3_samples_per_s": rate(remote, a.workers, a.epochs, a.decode)}  # fmt: skip
        finally:
            server.kill()
    result["s3_over_local"] = result["s3_samples_per_s"] / result["local_samples_per_s"]
    need = consumption(REPO / a.run)
    if need:
        result.update(training_images_per_s=need, s3_over_training=result["s3_samples_per_s"] / need)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
