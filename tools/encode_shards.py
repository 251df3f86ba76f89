#!/usr/bin/env python
"""Encode image shards into token shards for stage 2 with a trained dVAE's EMA weights.

    python tools/encode_shards.py --checkpoint outputs/dvae_small/checkpoints/step_00000400 \
        [--shards outputs/demo/shards] [--out outputs/demo/tokens] [--batch 64]

Tokens are the argmax of the encoder logits (no gumbel noise), so encoding is deterministic. Each sample:
`KEY.tokens.npy` (h, w) int16, `KEY.txt` (caption), `KEY.json` (metadata + grid shape, vocab, checkpoint).
The token set has the image set's splits and a manifest of the same format.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megadalle.config import ConfigError
from megadalle.data.loader import eval_images
from megadalle.data.shards import FORMAT, MANIFEST, ShardWriter, read_manifest, write_json_atomic
from megadalle.models.dvae_loss import map_pixels
from megadalle.stages.dvae import load_trained_dvae


@torch.no_grad()
def encode_shards(checkpoint: str, shards: str, out: str, batch: int = 64, progress: bool = True) -> dict:
    model, cfg = load_trained_dvae(checkpoint)
    a = model.args
    src = read_manifest(shards)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    splits = {}
    t0 = time.time()
    for split, info in src["splits"].items():
        writer = ShardWriter(out_path / split, split, cfg.data.shard_max_samples)
        bar = tqdm(total=info["samples"], desc=f"encoding {split}", disable=not progress)
        for images, captions, metas in eval_images(shards, split, a.image_size, batch):
            codes = model.encode_codes(map_pixels(images)).to(torch.int16).numpy()  # (B, h, w)
            for code, caption, meta in zip(codes, captions, metas):
                meta = dict(meta, grid=[a.grid_size, a.grid_size], vocab_size=a.vocab_size, dvae=str(checkpoint))
                writer.write({"__key__": meta["key"], "tokens.npy": code, "txt": caption, "json": meta})
            bar.update(len(captions))
        bar.close()
        recs = writer.close()
        splits[split] = {"samples": sum(r["samples"] for r in recs), "shards": recs}
        if splits[split]["samples"] != info["samples"]:
            raise RuntimeError(f"{split}: encoded {splits[split]['samples']} of {info['samples']} images")
    manifest = {
        "format": FORMAT,
        "content": "tokens",
        "created_by": "tools/encode_shards.py",
        "dvae_checkpoint": str(checkpoint),
        "grid": [a.grid_size, a.grid_size],
        "vocab_size": a.vocab_size,
        "image_shards": str(shards),
        "samples": sum(s["samples"] for s in splits.values()),
        "splits": splits,
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out_path / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or its extra.pt) with EMA weights")
    p.add_argument("--shards", default=None, help="image shard set (default: the checkpoint config's data.shards)")
    p.add_argument("--out", required=True, help="folder for the token shard set")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    try:
        shards = args.shards or load_trained_dvae(args.checkpoint)[1].data.shards
        m = encode_shards(args.checkpoint, shards, args.out, args.batch)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as e:
        print(f"encode_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"encoded {m['samples']} images into {m['grid'][0]}x{m['grid'][1]} grids of {m['vocab_size']} codes "
          f"in {m['seconds']} s -> {args.out}/{MANIFEST}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
