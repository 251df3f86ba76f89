#!/usr/bin/env python
"""The demo's quality targets (issue 9), measured from its checkpoints on the val split, into one JSON report.

    python tools/demo_report.py --prior outputs/prior_small/checkpoints --dvae outputs/dvae_small/checkpoints \
        --clip outputs/clip_small/checkpoints --shards outputs/demo/shards [--captions 64 --per-caption 8] \
        [--images 512] --out outputs/demo/report.json

dvae (EMA weights, argmax codes, val images at the dVAE's size):
  psnr_db / content_psnr_db   reconstruction PSNR over all pixels / over content pixels (not pure white);
  content_perplexity          perplexity of the codes at content cells (code cells whose patch is not all white);
  codes_used_fraction         share of the codebook used anywhere on val;
  mean_rgb_mae                mean absolute error of each image's mean RGB (colours kept or lost);
  kmeans_psnr_db              the yardstick: PSNR of a k-means codebook of the same size over the code cells'
                              patches (fit on --kmeans-images train images), each code standing for its patch alone.
prior (temperature 1, no reranking):
  caption_following_x_chance  --per-caption images for each of --captions val captions; the reranker scores each
                              image against all those captions; how often its own caption ranks first, / chance;
  caption_following_stderr_x  its binomial standard error (same unit), given these captions: the sampling noise;
  caption_following_4_x_chance  the same from the first min(4, --per-caption) images of each caption (the issue's
                               64 x 4 measure);
  caption_following_real_x_chance  the same for the real val images of those captions (a reference for the reranker);
  fid_samples                 FID of those images against the val images;
  fid_floor / fid_ceiling     the same for dVAE reconstructions of the val images (the floor) and for images decoded
                              from codes drawn independently from the val codes' unigram distribution (the ceiling);
  fid_fraction                (fid_samples - floor) / (ceiling - floor): 0 at the floor, 1 at the ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megadalle.data.loader import eval_images
from megadalle.engine.denormals import flush_denormals
from megadalle.evaluation import fid_from_features, inception_features, perplexity
from megadalle.models.dvae import DiscreteVAE
from megadalle.models.dvae_loss import map_pixels, reconstruction
from megadalle.models.kmeans import fit_kmeans, nearest, patches
from megadalle.sample import Models, load_models, sample

FIGURES: dict[str, tuple[str, ...]] = {
    "dvae": ("psnr_db", "content_psnr_db", "content_perplexity", "codes_used_fraction", "mean_rgb_mae",
             "kmeans_psnr_db"),
    "prior": ("caption_following_x_chance", "caption_following_stderr_x", "caption_following_4_x_chance",
              "caption_following_real_x_chance", "fid_samples", "fid_floor", "fid_ceiling", "fid_fraction"),
}  # fmt: skip
"""The figures every report holds, by section."""

WHITE = 1 - 1.5 / 255
"""A pixel is background when every channel is above this (pure white after 8-bit rounding)."""


def bad_figures(rep: dict) -> list[str]:
    """`section.name` of each of FIGURES that a report lacks or holds as a non-finite number (empty: all good)."""
    bad = []
    for section, names in FIGURES.items():
        for name in names:
            value = rep.get(section, {}).get(name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                bad.append(f"{section}.{name}={value!r}")
    return bad


def psnr(se: float, n: int) -> float:
    """PSNR in dB of images in [0, 1] from a summed squared error over n values (nan when there are none)."""
    return 10 * math.log10(n / max(se, 1e-12)) if n else float("nan")


@torch.no_grad()
def dvae_report(dvae: DiscreteVAE, images: torch.Tensor, batch: int = 64) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Reconstruction and codebook figures for images (N, 3, S, S) in [0, 1]; also the reconstructions and codes."""
    a = dvae.args
    f = a.downsample
    recons, codes = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        c = dvae.encode_codes(map_pixels(x))  # (b, h, w)
        recons.append(reconstruction(dvae.decoder.decode_codes(c)).clamp(0, 1))
        codes.append(c)
    recon, code = torch.cat(recons), torch.cat(codes)  # (N, 3, S, S), (N, h, w)
    content_px = (images < WHITE).any(dim=1, keepdim=True).expand_as(images)  # (N, 3, S, S)
    se = (recon - images).square()
    content_cells = patches(content_px[:, :1], f).any(dim=1).view(code.shape)  # (N, h, w)
    counts = torch.bincount(code.flatten(), minlength=a.vocab_size)  # (K,)
    report = {
        "psnr_db": psnr(float(se.sum()), se.numel()),
        "content_psnr_db": psnr(float(se[content_px].sum()), int(content_px.sum())),
        "content_perplexity": perplexity(torch.bincount(code[content_cells], minlength=a.vocab_size)),
        "codes_used_fraction": float((counts > 0).float().mean()),
        "perplexity": perplexity(counts),
        "content_cell_fraction": float(content_cells.float().mean()),
        "mean_rgb_mae": float((recon.mean(dim=(2, 3)) - images.mean(dim=(2, 3))).abs().mean()),
        "images": len(images),
    }
    return report, recon, code


@torch.no_grad()
def kmeans_psnr(train: torch.Tensor, val: torch.Tensor, f: int, k: int, iters: int = 15, seed: int = 0) -> float:
    """PSNR on `val` of the nearest of k centroids fit by k-means (Lloyd) to the f x f patches of `train`: what a
    codebook of k codes achieves when each code stands for its own patch alone, a yardstick for the dVAE."""
    v = patches(val, f)
    centroids = fit_kmeans(patches(train, f), k, iters, seed)
    se = (centroids[nearest(v, centroids)] - v).square()
    return psnr(float(se.sum()), se.numel())


@torch.no_grad()
def caption_scores(models: Models, captions: list[str], images: torch.Tensor) -> torch.Tensor:
    """The reranker's scores (M, C) of images (M, 3, S, S) against captions (C)."""
    clip, tok = models.clip, models.clip_tokenizer
    device = clip.logit_scale.device
    size = clip.a.image_size
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="area")
    img = clip.embed_images(images.to(device))  # (M, E)
    txt = clip.embed_text(tok.encode_batch(captions)[0].to(device))  # (C, E)
    return (img @ txt.T).cpu()


def first_choice_x_chance(scores: torch.Tensor, owner: torch.Tensor) -> tuple[float, float]:
    """scores (M, C) of M images against C captions, image m made for caption owner[m]: how often the image's own
    caption scores highest, divided by chance (1 / C), and the binomial standard error of that figure (0 when
    every image or none ranks its caption first)."""
    share = float((scores.argmax(dim=1).cpu() == owner).float().mean())
    c = scores.shape[1]
    return share * c, math.sqrt(share * (1 - share) / len(owner)) * c


@torch.no_grad()
def unigram_images(dvae: DiscreteVAE, codes: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n images decoded from grids whose codes are drawn independently from the unigram distribution of `codes`."""
    counts = torch.bincount(codes.flatten(), minlength=dvae.args.vocab_size).double()
    g = torch.Generator().manual_seed(seed)
    h, w = codes.shape[1:]
    drawn = torch.multinomial(counts / counts.sum(), n * h * w, replacement=True, generator=g).view(n, h, w)
    return torch.cat([reconstruction(dvae.decoder.decode_codes(drawn[i : i + 64])) for i in range(0, n, 64)])


def report(args: argparse.Namespace) -> dict:
    t0 = time.time()
    models = load_models(args.prior, args.dvae, args.clip, args.device)
    dvae = models.dvae
    size = dvae.args.image_size
    real, captions, _ = next(eval_images(args.shards, "val", size, args.images, args.images))
    if len(real) < 2:
        raise ValueError(f"the val split of {args.shards} has {len(real)} images; FID needs at least 2")
    d, recon, codes = dvae_report(dvae, real.to(models.device))
    train, _, _ = next(eval_images(args.shards, "train", size, args.kmeans_images, args.kmeans_images))
    d["kmeans_psnr_db"] = kmeans_psnr(train, real.cpu(), dvae.args.downsample, dvae.args.vocab_size, seed=args.seed)
    recon, codes, real = recon.cpu(), codes.cpu(), real.cpu()

    # captions in val order, each once (a concept has several images), the first --captions of them
    chosen = list(dict.fromkeys(captions))[: args.captions]
    results = sample(models, chosen, args.per_caption, 1, seed=args.seed, batch=args.batch, progress=args.progress)
    generated = torch.cat([r["images"].cpu() for r in results])  # (C * per_caption, 3, S, S)
    owner = torch.arange(len(chosen)).repeat_interleave(args.per_caption)
    ceiling = unigram_images(dvae.cpu(), codes, len(generated), args.seed)
    sets = {"real": real, "samples": generated, "floor": recon, "ceiling": ceiling}
    feats, cache = {}, Path(args.out).parent / "fid_cache"  # features by the images' content: reruns reuse them
    for name, x in tqdm(sets.items(), "FID features", disable=not args.progress):
        t = time.time()
        feats[name] = inception_features(x, cache=cache)
        print(f"demo_report: FID features of the {len(x)} {name} images in {time.time() - t:.1f} s", flush=True)
    fid = {f"fid_{name}": fid_from_features(feats["real"], feats[name]) for name in ("samples", "floor", "ceiling")}
    fid["fid_fraction"] = (fid["fid_samples"] - fid["fid_floor"]) / max(fid["fid_ceiling"] - fid["fid_floor"], 1e-9)
    # the same measure on the real val images of those captions: a reference for what the reranker tells apart
    index = {c: i for i, c in enumerate(chosen)}
    mine = [i for i, c in enumerate(captions) if c in index]
    real_owner = torch.tensor([index[captions[i]] for i in mine])
    scores = caption_scores(models, chosen, generated)  # (C * per_caption, C), caption-major
    following, stderr = first_choice_x_chance(scores, owner)
    first4 = torch.arange(len(owner)) % args.per_caption < 4  # each caption's first 4 samples (all if fewer)
    prior = {
        "caption_following_x_chance": following,
        "caption_following_stderr_x": stderr,
        "caption_following_4_x_chance": first_choice_x_chance(scores[first4], owner[first4])[0],
        "caption_following_real_x_chance": first_choice_x_chance(
            caption_scores(models, chosen, real[mine]), real_owner
        )[0],
        "captions": len(chosen),
        "per_caption": args.per_caption,
        **fid,
    }
    return {"dvae": d, "prior": prior, "val_images": len(real), "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # before the first torch operation starts the thread pool
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="prior checkpoint (folder, checkpoints/ folder or extra.pt)")
    p.add_argument("--dvae", required=True, help="dVAE checkpoint")
    p.add_argument("--clip", required=True, help="reranker checkpoint (scores caption following)")
    p.add_argument("--shards", required=True, help="image shard set with a val split")
    p.add_argument("--captions", type=int, default=64, help="distinct val captions to generate for")
    p.add_argument("--per-caption", type=int, default=8,
                   help="images generated per caption (8 x 64: as many samples as FID's 512 val images, and a "
                        "caption-following figure with half the variance of 4 per caption)")  # fmt: skip
    p.add_argument("--images", type=int, default=512, help="val images for the dVAE figures and as FID's real set")
    p.add_argument("--kmeans-images", type=int, default=2000, help="train images for the k-means yardstick")
    p.add_argument("--batch", type=int, default=16, help="sampling batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--out", default="outputs/demo/report.json")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars on stderr")
    args = p.parse_args(argv)
    try:
        rep = report(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"demo_report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rep, indent=1) + "\n")
    tmp.replace(out)
    d, r = rep["dvae"], rep["prior"]
    print(f"dVAE: PSNR {d['psnr_db']:.1f} dB (content {d['content_psnr_db']:.1f}; k-means of the patches "
          f"{d['kmeans_psnr_db']:.1f}), content perplexity "
          f"{d['content_perplexity']:.1f}, codes used {100 * d['codes_used_fraction']:.1f}%, mean-RGB MAE "
          f"{d['mean_rgb_mae']:.3f}")  # fmt: skip
    print(f"prior: caption following {r['caption_following_x_chance']:.2f}x chance (+- "
          f"{r['caption_following_stderr_x']:.2f}; first 4 per caption {r['caption_following_4_x_chance']:.2f}x) "
          f"over {r['captions']} captions x {r['per_caption']} "
          f"(real val images: {r['caption_following_real_x_chance']:.2f}x); "
          f"FID samples {r['fid_samples']:.1f}, floor {r['fid_floor']:.1f}, ceiling {r['fid_ceiling']:.1f} "
          f"(fraction {r['fid_fraction']:.2f}) -> {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
