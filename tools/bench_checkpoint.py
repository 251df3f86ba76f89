#!/usr/bin/env python
"""Benchmark: how long a checkpoint holds the training loop, synchronous vs `checkpoint.async_save`, in one run.

    python tools/bench_checkpoint.py [--flavor paper] [--world 2] [--saves 3] [--updates 3] [--side 64]

`world` CPU processes (ZeRO-3, fp32, EMA kept) build the dVAE of `flavor` as train.py does (the paper's: 97.6M
parameters, so each rank writes about 0.9 GB), then for each mode alternate `updates` training updates (random
images of `side` px) with a checkpoint, `saves` times, through engine/checkpoint.py's Checkpointer as train.py
calls it. Per mode: the seconds each save held the loop (the stall), the updates' median time before any save and
while a background write runs, and the time the last checkpoint took to complete. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_mode(mode: str, args: argparse.Namespace, rank: int, world: int) -> dict:
    import torch

    from megadalle.config import load_config
    from megadalle.engine.checkpoint import Checkpointer
    from megadalle.engine.distributed import barrier
    from megadalle.engine.ds_config import load_ds_config
    from megadalle.stages import make_stage
    from megadalle.train import build, train_update

    cfg = load_config(["--config", "megadalle/configs/dvae_debug.toml", f"--model.dvae_flavor={args.flavor}",
                       "--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--train.micro_batch_size=1",
                       f"--job.run_root={args.out}", f"--job.name={mode}", "--checkpoint.keep=1",
                       f"--checkpoint.async_save={mode == 'async'}", "--dvae.warm_start_steps=0"])  # fmt: skip
    stage = make_stage(cfg)
    state = build(cfg, stage, load_ds_config(cfg, world))
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", cfg)
    g = torch.Generator().manual_seed(rank)
    step, before, during, stalls = 0, [], [], []

    def update() -> float:
        nonlocal step
        x = torch.rand(1, 3, args.side, args.side, generator=g) * 0.8 + 0.1
        t0 = time.perf_counter()
        metrics = train_update(state.engine, state.optimizer, stage, [x], stage.schedules(step), ckpt.flags())
        ckpt.observe(metrics)
        step += 1
        return time.perf_counter() - t0

    for _ in range(args.updates):
        before.append(update())
    for _ in range(args.saves):
        barrier()
        ckpt.save(step, state)
        stalls.append(ckpt.stall_s)
        for _ in range(args.updates):
            during.append(update())
    t0 = time.perf_counter()
    ckpt.wait()
    wait = time.perf_counter() - t0
    return {"stall_s": stalls, "update_s_before": statistics.median(before),
            "update_s_after_save": statistics.median(during), "last_wait_s": wait}  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    from megadalle.engine.denormals import flush_denormals
    from megadalle.engine.distributed import init_distributed, is_main, shutdown

    flush_denormals()
    rank, world = init_distributed()
    results = {mode: run_mode(mode, args, rank, world) for mode in ("sync", "async")}
    if is_main():
        (Path(args.out) / "result.json").write_text(json.dumps(results))
    shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="paper")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--side", type=int, default=64, help="image side of the training updates (px)")
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.out is not None:  # one rank of the launch below
        worker(args)
        return 0
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.world)), DS_ACCELERATOR="cpu")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world}",
               "--master_addr=127.0.0.1", f"--master_port={29500 + os.getpid() % 1000}", __file__,
               f"--flavor={args.flavor}", f"--saves={args.saves}", f"--updates={args.updates}", f"--side={args.side}",
               f"--out={out}"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            return 1
        res = json.loads((Path(out) / "result.json").read_text())
    print(f"checkpoint stall, dVAE {args.flavor}, {args.world} ranks ZeRO-3 fp32 (rank 0; median of {args.saves})")
    print(f"{'mode':6} {'stall s':>8} {'update s before':>16} {'update s after':>15} {'last wait s':>12}")
    for mode, r in res.items():
        print(f"{mode:6} {statistics.median(r['stall_s']):8.2f} {r['update_s_before']:16.2f} "
              f"{r['update_s_after_save']:15.2f} {r['last_wait_s']:12.2f}")  # fmt: skip
    ratio = statistics.median(res["async"]["stall_s"]) / statistics.median(res["sync"]["stall_s"])
    print(f"async stall / sync stall: {ratio:.3f}")
    print(json.dumps({"flavor": args.flavor, "world": args.world, "stall_ratio": ratio, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
