"""Text -> image: sample N candidates per caption from the prior, decode them with the dVAE, rerank them with
the contrastive model and keep the best k (Sec. 2.6).

    python megadalle/sample.py --prior outputs/prior_small/checkpoints --dvae outputs/dvae_small/checkpoints \
        --clip outputs/clip_small/checkpoints --captions "red heart in twemoji style" --candidates 16 --keep 4 \
        [--captions-file F] [--temperature 1] [--top-k 0] [--top-p 1] [--seed 0] [--batch 16] \
        [--image-prompt PNG --prompt-rows R] [--device auto|cpu|cuda] --out outputs/samples

Writes `<out>/samples.png` (one row per caption, kept candidates best first, caption above) and
`<out>/scores.json` (every candidate's score and which were kept). The models, the KV cache, the random generator
and the decoding all run on --device (auto: cuda when a GPU is visible); only the results come back to the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from megadalle.data.transforms import center_resize, to_tensor, to_uint8
from megadalle.engine.denormals import flush_denormals
from megadalle.models.clip import ContrastiveModel
from megadalle.models.dvae import DiscreteVAE
from megadalle.models.dvae_loss import map_pixels, reconstruction
from megadalle.models.tokenizer import BPETokenizer
from megadalle.models.transformer import DallePrior
from megadalle.sampling import generate
from megadalle.stages.load import load_trained, resolve_device


@dataclass
class Models:
    prior: DallePrior
    dvae: DiscreteVAE
    clip: ContrastiveModel | None
    tokenizer: BPETokenizer
    clip_tokenizer: BPETokenizer | None

    @property
    def device(self) -> torch.device:
        return self.prior.text_head.weight.device


def load_models(prior: str, dvae: str, clip: str | None, device: str | torch.device = "cpu") -> Models:
    """Eval-mode models on `device` from checkpoints (EMA weights where the run kept them), checked against each
    other."""
    device = resolve_device(device)
    p, p_cfg = load_trained(prior, "prior", device)
    d = load_trained(dvae, "dvae", device)[0]
    if (d.args.grid_size, d.args.vocab_size) != (p.a.grid, p.a.image_vocab):
        raise ValueError(
            f"dVAE {dvae} makes {d.args.grid_size}x{d.args.grid_size} grids of {d.args.vocab_size} codes but prior "
            f"{prior} takes {p.a.grid}x{p.a.grid} of {p.a.image_vocab}"
        )
    t = p_cfg.tokenizer
    tok = BPETokenizer(t.model_path, t.max_len, 0.0, t.lowercase).eval()
    c = ctok = None
    if clip:
        c, c_cfg = load_trained(clip, "clip", device)
        ct = c_cfg.tokenizer
        ctok = BPETokenizer(ct.model_path, ct.max_len, 0.0, ct.lowercase).eval()
    return Models(p, d, c, tok, ctok)


def image_prompt_codes(models: Models, path: str, rows: int) -> torch.Tensor:
    """The first `rows` rows of the code grid of the image at `path`: (rows * grid,) on the models' device."""
    g = models.prior.a.grid
    if not 0 < rows < g:
        raise ValueError(f"--prompt-rows must be in [1, {g - 1}], got {rows}")
    with Image.open(path) as im:
        img = center_resize(np.asarray(im.convert("RGB")), models.dvae.args.image_size)
    x = to_tensor(img)[None].to(models.device)  # (1, 3, S, S)
    return models.dvae.encode_codes(map_pixels(x)).reshape(-1)[: rows * g]


@torch.no_grad()
def sample(
    models: Models,
    captions: list[str],
    candidates: int,
    keep: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch: int = 16,
    prefix: torch.Tensor | None = None,
    progress: bool = True,
) -> list[dict]:
    """Per caption: candidate images (N, 3, S, S), codes (N, H W), scores (N,) and the kept indices, best first.
    Sampled on the models' device; the tensors returned are on the CPU."""
    if keep > candidates:
        raise ValueError(f"cannot keep {keep} of {candidates} candidates")
    device = models.device
    gen = torch.Generator(device=device).manual_seed(seed)
    prefix = None if prefix is None else prefix.to(device)
    results = []
    for caption in tqdm(captions, desc="sampling", disable=not progress):
        text = models.tokenizer.encode_batch([caption])[0].to(device)  # (1, T)
        images, codes_all = [], []
        for start in range(0, candidates, batch):
            n = min(batch, candidates - start)
            pre = None if prefix is None else prefix[None].expand(n, -1)
            codes = generate(models.prior, text.expand(n, -1), pre, temperature, top_k, top_p, gen)  # (n, HW)
            g = models.prior.a.grid
            images.append(reconstruction(models.dvae.decoder.decode_codes(codes.view(n, g, g))))
            codes_all.append(codes)
        imgs = torch.cat(images)  # (N, 3, S, S) on the device
        scores = rerank_scores(models, imgs, caption).cpu()
        kept = rerank(scores, keep)
        results.append({"caption": caption, "images": imgs.cpu(), "codes": torch.cat(codes_all).cpu(),
                        "scores": scores, "kept": kept})  # fmt: skip
    return results


def rerank_scores(models: Models, images: torch.Tensor, caption: str) -> torch.Tensor:
    """The contrastive score of each candidate with the caption, on the reranker's device; zeros (sampling order
    kept) without a reranker."""
    if models.clip is None:
        return torch.zeros(len(images))
    images = images.to(models.clip.logit_scale.device)
    size = models.clip.a.image_size
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="area")
    text = models.clip_tokenizer.encode_batch([caption] * len(images))[0].to(images.device)
    return models.clip.score(images, text)


def rerank(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the `keep` highest scores, best first (ties: earlier candidate first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order[:keep]


def write_grid(results: list[dict], path: Path, label_height: int = 14, min_side: int = 96) -> None:
    """One row per caption, kept candidates best first, each row under its caption; small images are enlarged
    by a whole factor (nearest neighbour, no blur) to at least `min_side` pixels so that people can see them."""
    size = results[0]["images"].shape[-1]
    zoom = max(1, -(-min_side // size))  # ceil
    side = size * zoom
    keep = len(results[0]["kept"])
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(draw.textlength(r["caption"])) for r in results) + 4
    canvas = Image.new("RGB", (max(keep * side, text_width), len(results) * (side + label_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, r in enumerate(results):
        y = row * (side + label_height)
        draw.text((2, y + 1), r["caption"], fill=(0, 0, 0))
        for col, i in enumerate(r["kept"]):
            img = Image.fromarray(to_uint8(r["images"][i])).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(img, (col * side, y + label_height))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # before the first torch operation starts the thread pool
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True)
    p.add_argument("--dvae", required=True)
    p.add_argument("--clip", default=None, help="contrastive reranker checkpoint (without it: no reranking)")
    p.add_argument("--captions", nargs="*", default=[])
    p.add_argument("--captions-file", default=None, help="one caption a line")
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--keep", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-prompt", default=None, help="image whose first --prompt-rows code rows are kept")
    p.add_argument("--prompt-rows", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    captions = list(args.captions)
    try:
        if args.captions_file:
            captions += [line.strip() for line in Path(args.captions_file).read_text().splitlines() if line.strip()]
        if not captions:
            raise ValueError("no captions: give --captions or --captions-file")
        models = load_models(args.prior, args.dvae, args.clip, args.device)
        prefix = image_prompt_codes(models, args.image_prompt, args.prompt_rows) if args.image_prompt else None
        t0 = time.time()
        results = sample(models, captions, args.candidates, args.keep, args.temperature, args.top_k, args.top_p,
                         args.seed, args.batch, prefix)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_grid(results, out / "samples.png")
    report = {
        "prior": args.prior, "dvae": args.dvae, "clip": args.clip, "candidates": args.candidates, "keep": args.keep,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
        "image_prompt": args.image_prompt, "prompt_rows": args.prompt_rows, "device": str(models.device),
        "seconds": round(time.time() - t0, 2),
        "captions": [{"caption": r["caption"], "scores": [round(float(s), 4) for s in r["scores"]], "kept": r["kept"]}
                     for r in results],
    }  # fmt: skip
    (out / "scores.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"sampled {len(captions)} captions x {args.candidates} candidates in {report['seconds']} s -> {out}/samples.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
