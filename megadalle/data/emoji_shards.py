"""Build the emoji shard set: collect artwork, caption it, split it, render it, write shards and manifest."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megadalle.config import Data
from megadalle.data.captions import make_caption
from megadalle.data.emoji_sources import ArtItem, Skipped, collect
from megadalle.data.render import render_png
from megadalle.data.shards import FORMAT, MANIFEST, ShardWriter, write_json_atomic
from megadalle.data.splits import assign_splits

SPLITS = ("train", "val", "zeroshot")


def _render_job(args: tuple[ArtItem, int]) -> tuple[bytes | None, str]:
    return render_png(*args)


def build_emoji_shards(data: Data, out: str | Path, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write the shard set described by `data` into `out` (replacing an earlier one) and return its manifest."""
    out = Path(out)
    t0 = time.time()
    items, skipped = collect(data.sources, data.limit_per_source)
    if not items:
        raise ValueError(f"no usable emoji in sources {data.sources} ({len(skipped)} skipped)")
    assignments = assign_splits(items, data.val_percent, data.zeroshot_percent)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)  # shards mix concepts; the order is fixed by the seed

    for split in SPLITS:  # a rebuild never mixes old and new shards
        shutil.rmtree(out / split, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)
    writers = {s: ShardWriter(out / s, s, data.shard_max_samples) for s in SPLITS}
    per_source: Counter[str] = Counter()
    key = 0
    jobs = [(items[i], data.image_size) for i in order]
    with get_context("fork").Pool(max(1, data.render_workers)) as pool:
        results = pool.imap(_render_job, jobs, chunksize=16)
        for i, (png, reason) in tqdm(
            zip(order, results), total=len(order), desc=f"rendering {data.image_size}px", disable=not progress
        ):
            item, assignment = items[i], assignments[i]
            if png is None:
                skipped.append(Skipped(item.source, item.ref, "unreadable artwork", reason))
                continue
            concept, tones = item.concept_and_tones
            caption = make_caption(concept, tones, item.style if data.style_in_caption else None)
            meta = {
                "source": item.source,
                "style": item.style,
                "concept": concept,
                "tones": list(tones),
                "codepoints": item.codepoints,
                "name": item.name,
                "license": item.license,
                "caption_plain": make_caption(concept, tones, None),
                "split": assignment.split,
                "held_out": list(assignment.held_out),
                "file": Path(item.ref.split("#")[0]).name + ("#" + item.ref.split("#")[1] if "#" in item.ref else ""),
            }
            writers[assignment.split].write({"__key__": f"{key:06d}", "png": png, "txt": caption, "json": meta})
            per_source[item.source] += 1
            key += 1

    splits = {}
    for s, w in writers.items():
        shards = w.close()
        splits[s] = {"samples": sum(r["samples"] for r in shards), "shards": shards}
    reasons = Counter(sk.reason for sk in skipped)
    manifest = {
        "format": FORMAT,
        "created_by": "tools/make_shards.py",
        "image_size": data.image_size,
        "sources": data.sources,
        "limit_per_source": data.limit_per_source,
        "style_in_caption": data.style_in_caption,
        "val_percent": data.val_percent,
        "zeroshot_percent": data.zeroshot_percent,
        "seed": seed,
        "samples": sum(v["samples"] for v in splits.values()),
        "samples_per_source": dict(per_source),
        "splits": splits,
        "skipped": {
            "total": len(skipped),
            "by_reason": dict(reasons),
            "items": [{"source": s.source, "ref": s.ref, "reason": s.reason, "detail": s.detail} for s in skipped],
        },
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def summary(manifest: dict[str, Any]) -> str:
    """A few readable lines for the operator."""
    lines = [
        f"{manifest['samples']} samples at {manifest['image_size']}px from {', '.join(manifest['sources'])} "
        f"in {manifest['seconds']} s",
    ]
    for s, info in manifest["splits"].items():
        lines.append(f"  {s:9s} {info['samples']:6d} samples in {len(info['shards'])} shards")
    sk = manifest["skipped"]
    lines.append(f"  skipped   {sk['total']:6d} " + json.dumps(sk["by_reason"]))
    return "\n".join(lines)
