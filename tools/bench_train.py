#!/usr/bin/env python
"""Updates/s of each demo stage, eager against compiled and fp32 against bf16 autocast, measured in one run:

    python tools/bench_train.py [--stages dvae,prior,clip] [--variants fp32,bf16,bf16+compile,fp32+compile]
                                [--steps 20] [--warmup 3] [--rounds 1] [--json OUT.json]

Each (stage, variant) runs tools/profile_step.py in its own process (a fresh dynamo cache: the compile time is
paid in each), on the demo's run files (megadalle/configs/{dvae,prior,clip}_small.toml) with train.autocast and
train.compile set by the variant: `fp32` (autocast off, eager: the baseline), `bf16` (autocast bf16, eager),
`X+compile` (the same, compiled). Rounds alternate the variants, and the median of the rounds is reported, so a
machine's drift hits every variant alike. Columns: ms per update, updates/s, samples/s (prior: tokens/s), the
ratio to the baseline, the compile time (the first update's extra time over a later one, less the same for the
eager twin of the variant: start-up costs every variant pays), and the net seconds saved over the run file's
train.steps (time saved per update x steps - compile time). Recompilations after the first update (evaluation
under no_grad) are not counted. Needs the demo's data (`make demo`: shards,
tokenizer, token shards).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megadalle.config import load_config  # noqa: E402
from megadalle.engine.wrap import native_bf16  # noqa: E402

CONFIGS = {s: f"megadalle/configs/{s}_small.toml" for s in ("dvae", "prior", "clip")}
VARIANTS = {
    "fp32": ("off", False),
    "bf16": ("bf16", False),
    "bf16+compile": ("bf16", True),
    "fp32+compile": ("off", True),
}


def run_one(stage: str, variant: str, steps: int, warmup: int, extra: list[str]) -> dict:
    autocast, compiled = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, str(REPO / "tools" / "profile_step.py"), "--config", CONFIGS[stage],
               f"--steps={steps}", f"--warmup={warmup}", "--top=5", f"--json={out}",
               f"--train.autocast={autocast}", f"--train.compile={str(compiled).lower()}", *extra]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench_train: {stage} {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="dvae,prior,clip")
    ap.add_argument("--variants", default="fp32,bf16,bf16+compile", help=f"of {', '.join(VARIANTS)}; the first is "
                    "the baseline")  # fmt: skip
    ap.add_argument("--steps", type=int, default=20, help="timed updates per run")
    ap.add_argument("--warmup", type=int, default=3, help="updates before the timed ones (the first compiles)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every variant, alternating; the median is kept")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args, extra = ap.parse_known_args(argv)
    stages, variants = args.stages.split(","), args.variants.split(",")
    for s in stages:
        if s not in CONFIGS:
            ap.error(f"unknown stage {s!r} (of {', '.join(CONFIGS)})")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (of {', '.join(VARIANTS)})")
    print(f"bench_train: {os.cpu_count()} CPUs, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, "
          f"native bf16 on this CPU: {native_bf16('cpu')}; {args.steps} timed updates after {args.warmup}, "
          f"{args.rounds} round(s)", flush=True)  # fmt: skip
    rows = []
    for stage in stages:
        cfg = load_config(["--config", CONFIGS[stage], *extra])
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                runs[v].append(run_one(stage, v, args.steps, args.warmup, extra))
        base_ms = statistics.median(r["update_ms"] for r in runs[variants[0]])
        # the first update's extra time over a later one: the compilation, plus start-up costs every variant pays
        # (the loader's first batch, the dVAE's k-means warm start), taken from the eager twin of the variant
        startup = {v: statistics.median(r["first_update_ms"] - r["update_ms"] for r in runs[v]) / 1e3 for v in variants}
        for v in variants:
            ms = statistics.median(r["update_ms"] for r in runs[v])
            samples = runs[v][0]["samples_per_update"]
            twin = v.removesuffix("+compile") if v.removesuffix("+compile") in runs else variants[0]
            compile_s = max(0.0, startup[v] - startup[twin]) if VARIANTS[v][1] else 0.0
            row = {"stage": stage, "variant": v, "update_ms": ms, "updates_per_s": 1e3 / ms,
                   "samples_per_s": samples * 1e3 / ms, "ratio": base_ms / ms, "compile_s": compile_s,
                   "run_steps": cfg.train.steps, "rounds_ms": [r["update_ms"] for r in runs[v]],
                   "net_saving_s": cfg.train.steps * (base_ms - ms) / 1e3 - compile_s}  # fmt: skip
            if stage == "prior":
                from megadalle.models.transformer import FLAVORS

                row["tokens_per_s"] = row["samples_per_s"] * FLAVORS[cfg.model.prior_flavor].seq_len
            rows.append(row)
    print(f"{'stage':<7}{'variant':<14}{'ms/update':>10}{'updates/s':>11}{'samples/s':>11}{'tokens/s':>10}"
          f"{'x base':>8}{'compile s':>11}{'net s/run':>11}")  # fmt: skip
    for r in rows:
        tok = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        print(f"{r['stage']:<7}{r['variant']:<14}{r['update_ms']:>10.1f}{r['updates_per_s']:>11.2f}"
              f"{r['samples_per_s']:>11.1f}{tok:>10}{r['ratio']:>8.2f}{r['compile_s']:>11.1f}"
              f"{r['net_saving_s']:>11.0f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
