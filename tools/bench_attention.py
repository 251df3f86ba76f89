#!/usr/bin/env python
"""Benchmark: block-sparse attention for the prior's row, column and conv layouts, against baselines measured
in the same run on the same inputs.

GPU (default): the Triton kernels (kernels/block_sparse_attention.py) at the paper's stream, N = 1280 (256 text +
32x32), hd 64, heads 16 and 62, batch 8, fp16 and bf16, forward and forward+backward, against torch SDPA with a
causal mask (FlashAttention: the dense-causal work a sparse kernel must beat) and FlexAttention compiled with our
block layout (the same BlockMask). TFLOP/s count attended pairs only: 4 hd flops per pair forward, 14 forward +
backward (FlashAttention's convention: the backward is 2.5x the forward).

Flex is compiled once per (layout, dtype, heads) it is measured at (megadalle/engine/compiled.py: its own
torch.compile each, dynamo's recompile limit raised to cover them, a fallback to eager an error), for the dtypes
and heads of --flex-dtypes and --flex-heads (default: all rows; each costs an Inductor compile); the other rows
have `flex_compiled: false` and print "not compiled" instead of a ratio.

    python tools/bench_attention.py [--heads 16 62] [--batch 8] [--dtypes fp16 bf16] [--flex-heads 16]
        [--flex-dtypes fp16] [--json out.json]

CPU (--cpu): the attention op's training step (forward + backward of attention alone, no projections) of
`blocked` against dense masked SDPA, d 256 (4 heads of 64), at 256 + 32x32 (batch 2) and 64 + 16x16 (batch 8):
tokens/s and the ratio. `faster_than_dense` (what `auto` uses) is a threshold fitted to these numbers.

    python tools/bench_attention.py --cpu

Prints one table and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megadalle.models.blocked_attention import BlockedPlan, blocked_attention, faster_than_dense
from megadalle.models.sparsity import MaskSpec

LAYOUTS = ("row", "column", "conv")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _inputs(b: int, h: int, n: int, hd: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(b, h, n, hd, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3)]


def _step(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> Callable[[], None]:
    do = torch.randn_like(q)

    def run() -> None:
        out = fn(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), do)

    return run


def _time_cpu(run: Callable[[], None], reps: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_cpu(reps: int) -> list[dict]:
    rows = []
    for t, grid, batch in ((256, 32, 2), (64, 16, 8)):
        for kind in LAYOUTS:
            spec = MaskSpec(kind, t, grid, grid)
            mask = spec.dense()
            plan = BlockedPlan(spec)
            q, k, v = _inputs(batch, 4, spec.n, 64, torch.float32, "cpu")
            dense_fn = functools.partial(F.scaled_dot_product_attention, attn_mask=mask)
            dense = _time_cpu(_step(dense_fn, q, k, v, True), reps)
            blocked = _time_cpu(_step(functools.partial(blocked_attention, plan=plan), q, k, v, True), reps)
            tokens = batch * spec.n
            rows.append({"stream": f"{t}+{grid}x{grid}", "layout": kind, "batch": batch,
                         "dense_tokens_per_s": round(tokens / dense), "blocked_tokens_per_s": round(tokens / blocked),
                         "blocked_over_dense": round(dense / blocked, 2), "auto": "blocked" if faster_than_dense(plan)
                         else "dense", "computed_fraction": round(plan.computed_fraction(), 3)})  # fmt: skip
    print(f"CPU: attention forward + backward, d 256 = 4 heads x 64, fp32, {torch.get_num_threads()} threads")
    print(f"{'stream':>12} {'layout':>7} {'dense tok/s':>12} {'blocked tok/s':>14} {'ratio':>6} {'auto':>8}")
    for r in rows:
        print(f"{r['stream']:>12} {r['layout']:>7} {r['dense_tokens_per_s']:>12} {r['blocked_tokens_per_s']:>14} "
              f"{r['blocked_over_dense']:>5.2f}x {r['auto']:>8}")  # fmt: skip
    return rows


def bench_gpu(heads: list[int], batch: int, dtypes: list[str], flex_heads: list[int] | None = None,
              flex_dtypes: list[str] | None = None, on_row: Callable[[list[dict]], None] | None = None
              ) -> list[dict]:  # fmt: skip
    """The GPU rows; `on_row(rows so far)` after each (the JSON is rewritten as rows come: a timeout keeps them)."""
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    from kernels.block_sparse_attention import block_sparse_attention
    from megadalle.engine.compiled import CompiledPerKey
    from megadalle.models.attention import block_mask_from_spec

    t, grid, hd = 256, 32, 64
    flex = CompiledPerKey(flex_attention)
    rows = []
    for kind in LAYOUTS:
        spec = MaskSpec(kind, t, grid, grid)
        mask = spec.dense().cuda()
        pairs = int(mask.sum())
        block_mask = block_mask_from_spec(spec, "cuda", 128)
        for h in heads:
            for name in dtypes:
                q, k, v = _inputs(batch, h, spec.n, hd, DTYPES[name], "cuda")
                with_flex = (flex_heads is None or h in flex_heads) and (flex_dtypes is None or name in flex_dtypes)
                for backward in (False, True):
                    impls = {
                        "triton": functools.partial(block_sparse_attention, spec=spec),
                        "sdpa_causal": functools.partial(F.scaled_dot_product_attention, is_causal=True),
                    }
                    if with_flex:  # its own compiled callable per (layout, dtype, heads)
                        impls["flex"] = functools.partial(flex, (kind, name, h), block_mask=block_mask)
                    ms = {"flex": float("nan")}
                    for impl, fn in impls.items():
                        try:
                            ms[impl] = do_bench(_step(fn, q, k, v, backward), warmup=25, rep=100)
                        except Exception as e:  # a baseline that cannot run here is reported, not fatal
                            print(f"  {impl} failed on {kind} h{h} {name}: {type(e).__name__}: {e}", file=sys.stderr)
                            if impl == "triton":
                                raise
                            ms[impl] = float("nan")
                    compiled = bool(flex.compiled.get((kind, name, h))) and ms["flex"] == ms["flex"]
                    flops = batch * h * pairs * hd * (14 if backward else 4)
                    rows.append({"layout": kind, "heads": h, "dtype": name, "pass": "fwd+bwd" if backward else "fwd",
                                 "ms": {k_: round(v_, 3) for k_, v_ in ms.items()},
                                 "tflops": round(flops / ms["triton"] / 1e9, 1),
                                 "x_sdpa_causal": round(ms["sdpa_causal"] / ms["triton"], 2),
                                 "flex_compiled": compiled,
                                 "x_flex": round(ms["flex"] / ms["triton"], 2) if compiled else None})  # fmt: skip
                    if on_row is not None:
                        on_row(rows)
    print(f"GPU {torch.cuda.get_device_name()}: N {t + grid * grid}, hd {hd}, batch {batch}; x = baseline time / "
          "triton time (> 1: triton faster)")  # fmt: skip
    print(format_rows(rows))
    return rows


def format_rows(rows: list[dict]) -> str:
    """The GPU table (tools/gpu_check.sh prints it again in its summary)."""
    lines = [f"{'layout':>7} {'heads':>5} {'dtype':>5} {'pass':>8} {'triton ms':>10} {'TFLOP/s':>8} "
             f"{'x sdpa-causal':>13} {'x flex':>13}"]  # fmt: skip
    for r in rows:
        flex = f"{r['x_flex']:>12.2f}x" if r.get("flex_compiled") else f"{'not compiled':>13}"
        lines.append(f"{r['layout']:>7} {r['heads']:>5} {r['dtype']:>5} {r['pass']:>8} {r['ms']['triton']:>10.3f} "
                     f"{r['tflops']:>8.1f} {r['x_sdpa_causal']:>12.2f}x {flex}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the blocked PyTorch path against dense SDPA on the CPU")
    p.add_argument("--heads", type=int, nargs="+", default=[16, 62])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--flex-heads", type=int, nargs="+", default=None, help="compile Flex at these heads (all)")
    p.add_argument("--flex-dtypes", nargs="+", default=None, choices=sorted(DTYPES), help="... and dtypes (all)")
    p.add_argument("--reps", type=int, default=3, help="CPU: best of this many steps")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else torch.cuda.get_device_name()
    if args.cpu:
        rows = bench_cpu(args.reps)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: the GPU benchmark needs one (use --cpu for the blocked path)", file=sys.stderr)
            return 2
        rows = bench_gpu(args.heads, args.batch, args.dtypes, args.flex_heads, args.flex_dtypes,
                         functools.partial(_write, args.json, device) if args.json else None)  # fmt: skip
    line = json.dumps({"device": device, "rows": rows})
    print(line)
    if args.json:
        _write(args.json, device, rows, done=True)
    return 0


def _write(path: str, device: str, rows: list[dict], done: bool = False) -> None:
    """The JSON so far: the device, the rows, the printed table (GPU rows), whether every row is in."""
    table = format_rows(rows) if rows and "x_flex" in rows[0] else None
    with open(path, "w") as f:
        f.write(json.dumps({"device": device, "rows": rows, "table": table, "complete": done}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
