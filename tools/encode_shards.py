#!/usr/bin/env python
"""Encode image shards into token shards for stage 2 with a trained dVAE's EMA weights, on one process or many.

    python tools/encode_shards.py --checkpoint outputs/dvae_small/checkpoints/step_00000400 \
        [--shards outputs/demo/shards] [--val-shards SOURCE] [--out outputs/demo/tokens] [--batch 64] \
        [--augmentations K] [--seed 0] [--device auto] [--data.key=value ...]
    torchrun --nproc_per_node=8 tools/encode_shards.py --checkpoint ... --out s3://bucket/tokens/
    srun --ntasks=64 --kill-on-bad-exit=1 python tools/encode_shards.py --checkpoint ... --out s3://bucket/tokens/

The image data is the checkpoint config's [data] section (its shards, val_shards, image_keys, caption_key and
filters), with --shards / --val-shards in place of its sources and `--data.key=value` overrides: a shard set with a
manifest, or img2dataset's output. Each input shard becomes one token shard named after it, `<out>/<split>/<input
name>.tar`, local or s3://, written by rank i % world for input shard i; a rerun or a requeue (on any number of
ranks) skips the shards already written by the same checkpoint and flags. Rank 0 writes the manifest when every
rank is done. The details: megadalle/data/token_shards.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from megadalle.config import ConfigError, apply_overrides
from megadalle.data.s3 import S3Error
from megadalle.data.shards import MANIFEST
from megadalle.data.token_shards import encode_shards
from megadalle.engine.checkpoint import open_eval_weights
from megadalle.engine.denormals import flush_denormals


def launched_ranks() -> int:
    """The world size a launcher (torchrun, srun, mpirun) gave this process: 1 for a plain run."""
    sizes = [os.environ.get(v) for v in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")]
    return max([int(s) for s in sizes if s] or [1])


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
    world, t0 = launched_ranks(), time.time()
    try:
        cfg = open_eval_weights(args.checkpoint).cfg  # the config only: the weights load on the device
        apply_overrides(cfg, overrides, ("data",))
        val = cfg.data.val_shards if args.val_shards is None else args.val_shards
        data = dataclasses.replace(cfg.data, shards=args.shards or cfg.data.shards, val_shards=val)
        if world > 1:
            from megadalle.engine.distributed import init_distributed

            init_distributed(collective_timeout_s=7 * 24 * 3600.0)  # the last all-reduce waits for the slowest rank
        m = encode_shards(args.checkpoint, args.out, data, args.batch, args.augmentations, args.seed, args.device)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError, S3Error) as e:
        print(f"encode_shards: error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            from megadalle.engine.distributed import shutdown

            shutdown(barrier=False)
    if m is not None:
        if args.augmentations > 1 and m["central_only"]:
            print(f"encode_shards: warning: {m['central_only']} train images leave Listing 2 no room at the dVAE's "
                  f"side (smaller, or exactly that square): their {args.augmentations} views repeat the central "
                  f"view", file=sys.stderr)  # fmt: skip
        said = f", {m['skipped']['total']} skipped {m['skipped']['by_reason']}" if m["skipped"]["total"] else ""
        print(f"encoded {m['samples']} images into {m['grid'][0]}x{m['grid'][1]} grids of {m['vocab_size']} codes"
              f"{said} on {world} ranks in {time.time() - t0:.1f} s -> {args.out.rstrip('/')}/{MANIFEST}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
