#!/usr/bin/env python
"""Evaluate text -> image quality on the val (in-distribution) and zeroshot (held-out compositions) splits.

    python tools/evaluate.py --prior outputs/prior_small/checkpoints --dvae outputs/dvae_small/checkpoints \
        --clip outputs/clip_small/checkpoints --shards outputs/demo/shards --captions 16 \
        --rerank 1,2,4,8,16,32 --blur 0,1,2,4,8 --out outputs/eval

For each split, `--captions` captions with their real images; max(--rerank) candidates sampled per caption;
for each N in --rerank the contrastive model keeps the best of the first N. Reports, per split and N:
FID against the real images (after a Gaussian blur of each --blur radius applied to both sides), the
Inception-Score-style metric and the mean contrastive score. Writes <out>/eval.json and <out>/eval.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from megadalle.data.loader import eval_images
from megadalle.engine.denormals import flush_denormals
from megadalle.evaluation import blur as gaussian_blur
from megadalle.evaluation import fid_from_features, inception_features, inception_score
from megadalle.sample import load_models, rerank, sample


def evaluate(args: argparse.Namespace) -> dict:
    models = load_models(args.prior, args.dvae, args.clip)
    sweep = sorted(int(n) for n in args.rerank.split(","))
    radii = [float(r) for r in args.blur.split(",")]
    size = models.dvae.args.image_size
    report: dict = {"rerank": sweep, "blur": radii, "splits": {}}
    for split in args.splits.split(","):
        first = next(eval_images(args.shards, split, size, args.captions, args.captions), None)
        if first is None:  # a set without that split (an indexed img2dataset set has no zeroshot)
            print(f"evaluate: {args.shards} has no {split} samples: the split is left out", file=sys.stderr)
            continue
        real, captions, _ = first
        results = sample(models, list(captions), sweep[-1], 1, args.temperature, args.top_k, args.top_p, args.seed,
                         args.batch)  # fmt: skip
        entry: dict = {"captions": list(captions), "by_rerank": {}, "by_blur": {}}
        real_feats = {r: inception_features(gaussian_blur(real, r)) for r in sorted({0.0, *radii})}
        for n in sweep:
            best = [rerank(r["scores"][:n], 1)[0] for r in results]  # the reranker's pick among the first n
            chosen = torch.stack([r["images"][i] for r, i in zip(results, best)])  # (C, 3, S, S)
            entry["by_rerank"][str(n)] = {
                "fid": fid_from_features(real_feats[0.0], inception_features(chosen)),
                "inception_score": inception_score(chosen),
                "clip_score": sum(float(r["scores"][i]) for r, i in zip(results, best)) / len(results),
            }
        top = chosen  # the largest N
        for r in radii:
            entry["by_blur"][str(r)] = fid_from_features(real_feats[r], inception_features(gaussian_blur(top, r)))
        entry["real_inception_score"] = inception_score(real)
        report["splits"][split] = entry
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for split, e in report["splits"].items():
        ns = [int(n) for n in e["by_rerank"]]
        ax1.plot(ns, [e["by_rerank"][str(n)]["fid"] for n in ns], marker="o", label=split)
        rs = [float(r) for r in e["by_blur"]]
        ax2.plot(rs, [e["by_blur"][str(r)] for r in rs], marker="o", label=split)
    ax1.set(xscale="log", xlabel="candidates reranked (N)", ylabel="FID", title="FID vs rerank sample size")
    ax2.set(xlabel="Gaussian blur radius (both sides)", ylabel="FID", title="FID vs blur")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # before the first torch operation starts the thread pool
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True)
    p.add_argument("--dvae", required=True)
    p.add_argument("--clip", required=True)
    p.add_argument("--shards", required=True, help="image shard set with val and zeroshot splits")
    p.add_argument("--splits", default="val,zeroshot")
    p.add_argument("--captions", type=int, default=16, help="captions (and real images) per split")
    p.add_argument("--rerank", default="1,2,4,8,16,32")
    p.add_argument("--blur", default="0,1,2,4,8")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        report = evaluate(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "eval.png")
    for split, e in report["splits"].items():
        n = str(report["rerank"][-1])
        print(f"{split:9s} FID@N={n} {e['by_rerank'][n]['fid']:.1f}  IS {e['by_rerank'][n]['inception_score']:.2f}  "
              f"clip {e['by_rerank'][n]['clip_score']:.1f}  (real IS {e['real_inception_score']:.2f})")  # fmt: skip
    print(f"-> {out}/eval.json, {out}/eval.png ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
