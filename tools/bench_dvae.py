#!/usr/bin/env python
"""Benchmark: images/s of dVAE training, one process (ZeRO-0, the baseline) vs 2 processes (ZeRO-3), in one run.

    python tools/bench_dvae.py [--flavor small] [--steps 30] [--warmup 5] [--shards outputs/demo/shards]

Each configuration runs megadalle/train.py for real; the figure is the median of the per-step global
images/s after `warmup` steps, read from its metrics.jsonl. Prints a table and one JSON line.
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


def run(name: str, nproc: int, ds_config: str, args: argparse.Namespace, root: Path) -> dict:
    common = [
        "megadalle/train.py", "--config", "megadalle/configs/dvae_small.toml", f"--model.dvae_flavor={args.flavor}",
        f"--data.shards={args.shards}", f"--job.run_root={root}", f"--job.name={name}",
        f"--parallel.deepspeed_config={ds_config}", f"--train.steps={args.steps}", "--train.eval_every=0",
        f"--train.micro_batch_size={args.micro_batch}", f"--train.log_every={args.steps}", "--checkpoint.keep=1",
        "--dvae.warm_start_steps=0", "--dvae.elb_lr_scale=1",  # the paper's objective, no k-means warm start
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    if nproc == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={29500 + os.getpid() % 1000}", *common]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    ips = [m["images_per_s"] for m in lines if m["kind"] == "train"][args.warmup :]
    return {"name": name, "processes": nproc, "ds_config": ds_config, "images_per_s": statistics.median(ips),
            "steps_measured": len(ips)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="small")
    p.add_argument("--shards", default="outputs/demo/shards")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=16, help="per process; the global batch doubles on 2 ranks")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = run("single_zero0", 1, "ds_configs/zero0_cpu.json", args, Path(tmp))
        z3 = run("two_proc_zero3", 2, "ds_configs/zero3_cpu.json", args, Path(tmp))
    ratio = z3["images_per_s"] / base["images_per_s"]
    print(f"{'configuration':18s} {'procs':>5s} {'images/s':>9s}")
    for r in (base, z3):
        print(f"{r['name']:18s} {r['processes']:5d} {r['images_per_s']:9.2f}")
    print(f"ratio 2-process ZeRO-3 / 1-process ZeRO-0: {ratio:.2f}x  (flavor {args.flavor}, {os.cpu_count()} CPUs)")
    print(json.dumps({"flavor": args.flavor, "cpus": os.cpu_count(), "baseline": base, "zero3_2proc": z3,
                      "ratio": round(ratio, 3)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
