#!/usr/bin/env python
"""Benchmark: can the data path feed the paper's dVAE on real photos? In one run, on this machine:

    python tools/bench_decode.py [--images 256] [--size 640x480] [--workers 2] [--batch 4] [--steps 3]

1. JPEG decode + Listing 1 at 256 px: the loader's real training stream (data/loader.py: the image member
   chosen, decoded, EXIF applied, Listing 1's crops and flip) in `--workers` DataLoader workers, over a shard set
   of synthetic photos (smooth colour fields with fine grain, JPEG quality 90, `--size`), images/s over one epoch
   after its first batch;
2. what the paper's dVAE (97.6M parameters) consumes: images/s of its training updates (forward, backward, Adam)
   at `--batch` images of 256 px, after one warm-up update, in this process with every core.

Prints a table, the ratio (decode / consume; the issue asks for at least 2) and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path


def photo_shards(root: Path, n: int, size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    from megadalle.data.shards import FORMAT, MANIFEST, ShardWriter, write_json_atomic

    rng = np.random.default_rng(0)
    writer = ShardWriter(root / "train", "train", 64)
    w, h = size
    for i in range(n):
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)  # grain: JPEG has work to do
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        writer.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": f"photo {i}", "json": {}})
    shards = writer.close()
    write_json_atomic(root / MANIFEST, {"format": FORMAT, "splits": {"train": {"samples": n, "shards": shards}}})


def decode_rate(root: Path, workers: int, batch: int) -> float:
    from megadalle.config import Data
    from megadalle.data.loader import SkipCounter, train_images

    stream = train_images(Data(shards=str(root), num_workers=workers, shuffle_buffer=0), 256, batch, 0, 0,
                          SkipCounter(), world=1)  # fmt: skip
    stream.max_epochs = 1
    it = iter(stream)
    next(it)  # the workers started
    t0, n = time.perf_counter(), 0
    for images, _ in it:
        n += len(images)
    return n / (time.perf_counter() - t0)


def dvae_rate(batch: int, steps: int) -> float:
    import torch

    from megadalle.models.dvae import FLAVORS, DiscreteVAE
    from megadalle.models.dvae_loss import map_pixels

    torch.manual_seed(0)
    model = DiscreteVAE(FLAVORS["paper"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = map_pixels(torch.rand(batch, 3, 256, 256))
    times = []
    for _ in range(steps + 1):  # the first: a warm-up
        t0 = time.perf_counter()
        model(x, 1.0, 0.0).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return batch / (sum(times[1:]) / steps)


def main() -> int:
    from megadalle.engine.denormals import flush_denormals

    flush_denormals()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", default="640x480", help="the photos' width x height")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photo_shards(root, args.images, (w, h))
        decode = decode_rate(root, args.workers, 16)
    consume = dvae_rate(args.batch, args.steps)
    ratio = decode / consume
    print(f"{'what':52} {'images/s':>9}")
    print(f"{f'JPEG {w}x{h} decode + Listing 1 at 256 px, {args.workers} workers':52} {decode:9.1f}")
    print(f"{f'paper dVAE (97.6M) updates at 256 px, batch {args.batch}':52} {consume:9.2f}")
    print(f"decode / consume: {ratio:.1f}x")
    print(json.dumps({"decode_images_per_s": decode, "dvae_images_per_s": consume, "ratio": ratio, "size": [w, h],
                      "workers": args.workers, "batch": args.batch}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
