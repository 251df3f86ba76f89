#!/usr/bin/env python
"""Benchmark: sampling the image tokens of one caption with the KV cache vs a full forward per token
(the baseline), same model, same run, same seeds.

    python tools/bench_sampling.py [--flavor debug] [--full-sequence] [--batch 4] [--repeats 1]

--full-sequence keeps the flavor's width and depth but uses the paper's stream: 256 text + 32x32 = 1280
positions, vocabularies 16,384 and 8,192.

Both draw the same codes (checked); prints seconds per image for each and the speed-up ratio, plus one JSON line.
dalle-pytorch's generate_images is not compared: it depends on torchvision and an unpinned torch (a CUDA
build of several GB), which this project does not install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from megadalle.models.transformer import FLAVORS, DallePrior
from megadalle.sampling import generate, generate_uncached


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--full-sequence", action="store_true", help="the paper's 1280-position stream")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    a = FLAVORS[args.flavor]
    if args.full_sequence:
        a = dataclasses.replace(a, text_len=256, grid=32, text_vocab=16384, image_vocab=8192)
    torch.manual_seed(0)
    model = DallePrior(a).eval()
    text = torch.randint(4, a.text_vocab, (args.batch, a.text_len))
    timings = {}
    codes = {}
    for name, fn in (("kv_cache", generate), ("no_cache", generate_uncached)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            codes[name] = fn(model, text, generator=torch.Generator().manual_seed(1))
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    same = torch.equal(codes["kv_cache"], codes["no_cache"])
    ratio = timings["no_cache"] / timings["kv_cache"]
    per = {k: v / args.batch for k, v in timings.items()}
    print(f"flavor {args.flavor}: {a.seq_len} positions ({a.grid}x{a.grid} image tokens), batch {args.batch}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"  kv_cache  {per['kv_cache']:8.3f} s/image")
    print(f"  no_cache  {per['no_cache']:8.3f} s/image")
    print(f"  speed-up  {ratio:8.1f}x   identical codes: {same}")
    print(json.dumps({"flavor": args.flavor, "seq_len": a.seq_len, "batch": args.batch, "cpus": os.cpu_count(),
                      "s_per_image": per, "ratio": round(ratio, 2), "identical": same}))  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
