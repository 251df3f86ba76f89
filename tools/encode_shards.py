#!/usr/bin/env python
"""Encode image shards into token shards for stage 2 with a trained dVAE's EMA weights.

    python tools/encode_shards.py --checkpoint outputs/dvae_small/checkpoints/step_00000400 \
        [--shards outputs/demo/shards] [--out outputs/demo/tokens] [--batch 64] [--augmentations K] [--seed 0]

Tokens are the argmax of the encoder logits (no gumbel noise), so encoding is deterministic. Each sample:
`KEY.tokens.npy` (h, w) int16, `KEY.txt` (caption), `KEY.json` (metadata + grid shape, vocab, checkpoint).
The token set has the image set's splits and a manifest of the same format, which records "augmentations".

With --augmentations K > 1, each TRAIN image is encoded K times and stored as (K, h, w) int16: index 0 the
central view (the K = 1 encoding), indices 1..K-1 Listing 2 draws (prior_augment) from random.Random(--seed),
in manifest order, so the set is reproducible; train_tokens picks one of the K per sample. Evaluation splits
(val, zeroshot) always keep the single central view as (h, w), whatever K. An image that gives Listing 2 no
room (smaller than the dVAE's side, or exactly that square) repeats its central view K times; such images are
counted, printed and recorded in the manifest ("central_only"). Image shards made at the dVAE's own side leave
no room at all: make them larger (the paper's Listing 2 resizes to up to 9/8 of the target).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megadalle.config import ConfigError
from megadalle.data.loader import eval_images, eval_samples, s3_settings
from megadalle.data.shards import FORMAT, MANIFEST, ShardWriter, read_any_manifest, write_json_atomic
from megadalle.data.transforms import center_resize, prior_augment, to_tensor
from megadalle.engine.denormals import flush_denormals
from megadalle.models.dvae_loss import map_pixels
from megadalle.stages.load import load_trained


def views(img: np.ndarray, size: int, k: int, rng: random.Random, central_only: list[int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (k, 3, size, size) in [0, 1]: the central view, then k - 1 Listing 2 draws; k copies
    of the central view where Listing 2 has no room (counted in central_only[0])."""
    central = center_resize(img, size)
    if min(img.shape[:2]) < size or img.shape[:2] == (size, size):
        central_only[0] += 1
        return to_tensor(central).expand(k, -1, -1, -1)  # (k, 3, size, size)
    return torch.stack([to_tensor(central)] + [to_tensor(prior_augment(img, size, rng)) for _ in range(k - 1)])


@torch.no_grad()
def encode_shards(
    checkpoint: str,
    shards: str,
    out: str,
    batch: int = 64,
    progress: bool = True,
    augmentations: int = 1,
    seed: int = 0,
) -> dict:
    """Encode every split; `augmentations` views of each train image (see the module docstring)."""
    if augmentations < 1:
        raise ValueError(f"--augmentations must be at least 1, got {augmentations}")
    model, cfg = load_trained(checkpoint, "dvae")
    a = model.args
    settings = s3_settings(cfg.data)  # the checkpoint's endpoint (or AWS_ENDPOINT_URL) for an s3:// shard set
    src = read_any_manifest(shards, settings)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    splits = {}
    central_only = [0]
    t0 = time.time()
    for split, info in src["splits"].items():
        writer = ShardWriter(out_path / split, split, cfg.data.shard_max_samples)
        bar = tqdm(total=info["samples"], desc=f"encoding {split}", disable=not progress)
        k = augmentations if split == "train" else 1
        if k == 1:
            batches = eval_images(shards, split, a.image_size, batch, settings=settings)
        else:
            view = partial(views, size=a.image_size, k=k, rng=random.Random(seed), central_only=central_only)
            batches = eval_samples(shards, split, lambda s, view=view: view(s["image"]), batch, settings=settings)
        for images, captions, metas in batches:
            if k == 1:
                codes = model.encode_codes(map_pixels(images)).to(torch.int16).numpy()  # (B, h, w)
            else:
                # the central views alone, as with K = 1, so that index 0 is the K = 1 encoding bit for bit
                first = model.encode_codes(map_pixels(images[:, 0]))  # (B, h, w)
                rest = model.encode_codes(map_pixels(images[:, 1:].flatten(0, 1)))  # (B*(K-1), h, w)
                rest = rest.view(len(captions), k - 1, a.grid_size, a.grid_size)  # (B, K-1, h, w)
                codes = torch.cat([first[:, None], rest], dim=1).to(torch.int16).numpy()  # (B, K, h, w)
            for code, caption, meta in zip(codes, captions, metas):
                meta = dict(meta, grid=[a.grid_size, a.grid_size], vocab_size=a.vocab_size, dvae=str(checkpoint))
                meta["augmentations"] = k
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
        "augmentations": augmentations,
        "augment_seed": seed,
        "central_only": central_only[0],
        "image_shards": str(shards),
        "samples": sum(s["samples"] for s in splits.values()),
        "splits": splits,
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out_path / MANIFEST, manifest)
    if augmentations > 1 and central_only[0]:
        print(
            f"encode_shards: warning: {central_only[0]} train images leave Listing 2 no room at {a.image_size}px "
            f"(smaller, or exactly that square): their {augmentations} views repeat the central view",
            file=sys.stderr,
        )
    return manifest


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # before the first torch operation starts the thread pool
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or its extra.pt) with EMA weights")
    p.add_argument("--shards", default=None, help="image shard set (default: the checkpoint config's data.shards)")
    p.add_argument("--out", required=True, help="folder for the token shard set")
    p.add_argument("--batch", type=int, default=64, help="images per encoder call (times K for train views)")
    p.add_argument("--augmentations", type=int, default=1, help="views per train image: central + K-1 Listing 2")
    p.add_argument("--seed", type=int, default=0, help="seed of the Listing 2 draws")
    args = p.parse_args(argv)
    try:
        shards = args.shards or load_trained(args.checkpoint, "dvae")[1].data.shards
        m = encode_shards(
            args.checkpoint, shards, args.out, args.batch, augmentations=args.augmentations, seed=args.seed
        )
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as e:
        print(f"encode_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"encoded {m['samples']} images into {m['grid'][0]}x{m['grid'][1]} grids of {m['vocab_size']} codes "
          f"in {m['seconds']} s -> {args.out}/{MANIFEST}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
