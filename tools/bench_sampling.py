#!/usr/bin/env python
"""Benchmark: sampling the image tokens of one caption with the KV cache, reading per token only the keys its
layer's mask allows (`kv_cache`), against two baselines in the same run with the same model and seeds: the KV
cache attending the whole prefix with the dense mask (`kv_dense_prefix`), and a full forward per token
(`no_cache`, skipped with --no-baseline).

    python tools/bench_sampling.py [--flavor debug] [--full-sequence] [--batch 4] [--repeats 1]
                                   [--n-layers L] [--d-model D] [--n-heads H] [--no-baseline]

--full-sequence keeps the flavor's width and depth but uses the paper's stream: 256 text + 32x32 = 1280
positions, vocabularies 16,384 and 8,192.

All draw the same codes (checked); prints seconds per image for each and the speed-up ratios, plus one JSON line.
The issue 10 goal: `--full-sequence --n-layers 2 --d-model 256 --n-heads 4 --batch 1 --no-baseline`, <= 1.0 s.
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

from megadalle.engine.denormals import flush_denormals
from megadalle.models.transformer import FLAVORS, DallePrior
from megadalle.sampling import generate, generate_uncached


def main() -> int:
    flush_denormals()  # before the first torch operation starts the thread pool
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--full-sequence", action="store_true", help="the paper's 1280-position stream")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--n-layers", type=int, default=0, help="override the flavor's depth")
    p.add_argument("--d-model", type=int, default=0, help="override the flavor's width")
    p.add_argument("--n-heads", type=int, default=0, help="override the flavor's head count")
    p.add_argument("--no-baseline", action="store_true", help="time the KV cache only (the baseline is slow)")
    args = p.parse_args()
    a = FLAVORS[args.flavor]
    if args.full_sequence:
        a = dataclasses.replace(a, text_len=256, grid=32, text_vocab=16384, image_vocab=8192)
    overrides = {"n_layers": args.n_layers, "d_model": args.d_model, "n_heads": args.n_heads}
    a = dataclasses.replace(a, **{k: v for k, v in overrides.items() if v})
    torch.manual_seed(0)
    model = DallePrior(a).eval()
    text = torch.randint(4, a.text_vocab, (args.batch, a.text_len))
    timings: dict[str, float] = {}
    codes: dict[str, torch.Tensor] = {}
    runs = [("kv_cache", generate, True), ("kv_dense_prefix", generate, False)]
    if not args.no_baseline:
        runs.append(("no_cache", generate_uncached, True))
    for name, fn, sparse in runs:
        for layer in model.layers:
            layer.attn.sparse_decode = sparse
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            codes[name] = fn(model, text, generator=torch.Generator().manual_seed(1))
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    same = all(torch.equal(codes["kv_cache"], c) for c in codes.values())
    per = {k: v / args.batch for k, v in timings.items()}
    ratios = {f"{k}/kv_cache": round(v / timings["kv_cache"], 2) for k, v in timings.items() if k != "kv_cache"}
    print(f"flavor {args.flavor}: {a.seq_len} positions ({a.grid}x{a.grid} image tokens), {a.n_layers} layers of "
          f"{a.d_model}, batch {args.batch}, {torch.get_num_threads()} threads")  # fmt: skip
    for name, s in per.items():
        ratio = "" if name == "kv_cache" else f"   {timings[name] / timings['kv_cache']:5.1f}x kv_cache's time"
        print(f"  {name:16s} {s:8.3f} s/image{ratio}")
    print(f"  identical codes: {same}")
    print(json.dumps({"flavor": args.flavor, "seq_len": a.seq_len, "n_layers": a.n_layers, "d_model": a.d_model,
                      "batch": args.batch, "cpus": os.cpu_count(), "s_per_image": per, "ratios": ratios,
                      "identical": same}))  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
