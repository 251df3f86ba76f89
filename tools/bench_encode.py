#!/usr/bin/env python
"""Benchmark: tools/encode_shards.py's images/s on this machine at 1 and 2 ranks, in one run.

    python tools/bench_encode.py [--flavor paper] [--size 256] [--images 64] [--shard 8] [--batch 8]

A dVAE of `--flavor` at its initialisation (the speed does not depend on the weights; the paper's is 97.6M
parameters, 272 GFLOP per image through the encoder) is written as a step-0 checkpoint; `--images` synthetic photos
(JPEG, `--size` square plus a quarter, so Listing 2 has room) in shards of `--shard`, img2dataset-style. The encoder
then runs over them three ways, each from a fresh output folder: 1 rank with every core's threads, 1 rank with one
thread, and 2 ranks (torchrun) with one thread each. Images/s is the samples over the wall time of the encoding
(model loading excluded: the tool's own per-rank line). Prints a table, the 2-rank / 1-rank ratio and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the tool runs tools/encode_shards.py from the checkout


def photos(folder: Path, n: int, side: int, per_shard: int) -> None:
    """img2dataset-style shards of smooth colour fields with grain, JPEG quality 90, with _stats.json."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for shard in range((n + per_shard - 1) // per_shard):
        count = min(per_shard, n - shard * per_shard)
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for i in range(count):
                coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
                img = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC), np.float32)
                img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                tar.write({"__key__": f"{shard:05d}{i:04d}", "jpg": buf.getvalue(), "txt": b"a photo"})
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": count}))


def checkpoint(run: Path, flavor: str, size: int) -> Path:
    import torch

    from megadalle.config import JobConfig
    from megadalle.engine.checkpoint import write_weights_checkpoint
    from megadalle.models.dvae import DiscreteVAE
    from megadalle.stages.dvae import dvae_args

    cfg = JobConfig()
    cfg.job.stage, cfg.model.dvae_flavor, cfg.data.image_size = "dvae", flavor, size
    torch.manual_seed(0)
    model = DiscreteVAE(dvae_args(cfg))
    return write_weights_checkpoint(run, model.state_dict(), cfg, f"bench_encode: {flavor} at initialisation")


def encode(ckpt: Path, shards: Path, out: Path, nproc: int, threads: int, batch: int) -> tuple[float, float, int]:
    """(images/s of the encoding, its wall seconds, images) from the tool's per-rank lines (the slowest rank)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "tools/encode_shards.py"]
    if nproc > 1:
        from megadalle.engine.distributed import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "tools/encode_shards.py"]  # fmt: skip
    cmd += ["--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out), "--batch", str(batch)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    ranks = re.findall(r"rank \d+: \d+ shards, (\d+) images in ([\d.]+) s", proc.stdout)
    if len(ranks) != nproc:
        raise RuntimeError(f"expected {nproc} rank summaries in:\n{proc.stdout[-2000:]}")
    images, seconds = sum(int(n) for n, _ in ranks), max(float(s) for _, s in ranks)
    return images / seconds, seconds, images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="paper", help="dVAE flavor (models/dvae.py FLAVORS)")
    ap.add_argument("--size", type=int, default=256, help="the dVAE's image side in pixels")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--shard", type=int, default=8, help="images per input shard")
    ap.add_argument("--batch", type=int, default=8, help="images per encoder call")
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos(root / "photos", a.images, a.size + a.size // 4, a.shard)
        ckpt = checkpoint(root / "run", a.flavor, a.size)
        rows = {}
        for name, nproc, threads in (("1 rank", 1, cores), ("1 rank, 1 thread", 1, 1), ("2 ranks", 2, 1)):
            t = time.time()
            rate, seconds, images = encode(ckpt, root / "photos", root / name.replace(" ", "_"), nproc, threads,
                                           a.batch)  # fmt: skip
            rows[name] = {"images_per_s": round(rate, 3), "seconds": round(seconds, 2), "images": images,
                          "threads_per_rank": threads, "wall_s_with_start": round(time.time() - t, 1)}  # fmt: skip
    print(f"dVAE {a.flavor} encoder at {a.size} px, {a.images} JPEG photos in shards of {a.shard}, batch {a.batch}, "
          f"{cores} cores")  # fmt: skip
    for name, r in rows.items():
        print(f"  {name:<18} {r['images_per_s']:>9.3f} images/s  ({r['images']} images in {r['seconds']} s; "
              f"{r['threads_per_rank']} threads a rank)")  # fmt: skip
    ratio = rows["2 ranks"]["images_per_s"] / rows["1 rank"]["images_per_s"]
    print(f"  2 ranks / 1 rank (both on all {cores} cores): {ratio:.2f}x")
    print(json.dumps({"flavor": a.flavor, "size": a.size, "cores": cores, "rows": rows, "ratio_2_over_1": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
