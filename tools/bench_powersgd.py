#!/usr/bin/env python
"""PowerSGD across a slow link (issue 12's benchmark): two network namespaces joined by a veth pair with a `tc`
rate limit, two processes in each (2 node groups x 2 GPUs, gloo), the intra-node traffic on each side local.

    python tools/bench_powersgd.py [--rate 1gbit] [--d 512] [--layers 4] [--steps 200] [--out build/bench_powersgd]

1. sync: the time of one cross-node gradient averaging (engine/powersgd.py, what ZeRO-3 calls each update) for the
   shards of an L-layer, d-wide prior on one of 2 GPUs (Table 2's shapes: the 1p3b flavor is d 2048 x 24 layers;
   --d and --layers scale it to this machine), uncompressed (one fp32 all-reduce) against PowerSGD at the paper's
   rank scaled to the width (r = 896 d / 3968, as for 12B); and the same PowerSGD step without the link (its
   compute alone). Median of --iters after a warm-up.
2. train: the debug prior, --steps updates through train.py across the namespaces, PowerSGD (--train-rank,
   --start-iter) against uncompressed averaging; both loss curves in OUT/loss_curves.png.

Needs root (ip netns, tc). Writes OUT/summary.json and prints it. The ratios are what to read: this CPU computes a
PowerSGD step about 100x slower than a GPU, so the link is the lever (--rate 100mbit shows the GPU's balance).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from slow_link import ADDR, DEV, available, in_ns, link_down, link_up  # noqa: E402


def launch(argv: list[str], port: int, log_dir: Path, tag: str) -> None:
    """Ranks 0, 1 in the first namespace (node group 0), 2, 3 in the second; waits for all four."""
    procs = []
    for rank in range(4):
        node = rank // 2
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank % 2), WORLD_SIZE="4", MASTER_ADDR=ADDR[0],
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=DEV[node], OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")  # fmt: skip
        out = open(log_dir / f"{tag}_rank{rank}.log", "w")
        procs.append((subprocess.Popen(in_ns(node, argv), cwd=REPO, env=env, stdout=out,
                                       stderr=subprocess.STDOUT), out))  # fmt: skip
    codes = [p.wait() for p, _ in procs]
    for _, out in procs:
        out.close()
    if any(codes):
        raise SystemExit(f"{tag}: exit codes {codes}; logs in {log_dir}/{tag}_rank*.log")


# --- 1. sync --------------------------------------------------------------------------------------------------------


def layer_shards(d: int, layers: int, m: int = 2) -> list:
    from megadalle.engine.powersgd import Shard

    out = []
    for layer in range(layers):
        att, mlp = 2 * layer, 2 * layer + 1
        out += [Shard(f"l{layer}.attn.{n}", d * d // m, (d, d // m), att) for n in ("q", "k", "v", "proj")]
        out += [Shard(f"l{layer}.mlp.fc", 4 * d * d // m, (d, 4 * d // m), mlp),
                Shard(f"l{layer}.mlp.proj", 4 * d * d // m, (4 * d // m, d), mlp),
                Shard(f"l{layer}.gains", 4 * d // m, None, mlp)]  # fmt: skip
    return out


def sync_worker(d: int, layers: int, rank_r: int, iters: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from megadalle.engine.powersgd import Collectives, PowerSGD, Topology, new_groups

    dist.init_process_group("gloo")
    topo = Topology(4, 2, dist.get_rank())
    _, cross = new_groups(topo)
    shards = layer_shards(d, layers)
    g = torch.Generator().manual_seed(topo.local)
    grads = [torch.randn(s.numel, generator=g) * 1e-3 for s in shards]
    scales = [1.0] * len(shards)
    comm = Collectives(cross, topo.n_nodes)
    psgd = PowerSGD(shards, rank_r // 2, comm, seed=0)
    solo = PowerSGD(shards, rank_r // 2, Collectives(None, 1), seed=0)  # the same compute, no link
    times: dict[str, list[float]] = {"uncompressed": [], "powersgd": [], "powersgd_compute": []}
    sent: dict[str, int] = {}
    for name, fn in (("uncompressed", lambda: psgd.reduce(grads, scales, compress=False)),
                     ("powersgd", lambda: psgd.reduce(grads, scales)),
                     ("powersgd_compute", lambda: solo.reduce(grads, scales))):  # fmt: skip
        for i in range(iters + 2):
            dist.barrier()
            before, t0 = comm.bytes_sent, time.perf_counter()
            fn()
            dist.barrier()
            if i >= 2:  # warm-up: the first calls allocate
                times[name].append(time.perf_counter() - t0)
                sent[name] = comm.bytes_sent - before
    if dist.get_rank() == 0:
        result = {k: statistics.median(v) for k, v in times.items()}
        result.update({f"bytes_sent_{k}": v for k, v in sent.items()}, element_rate=psgd.element_rate())
        (out / "sync.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# --- 2. train -------------------------------------------------------------------------------------------------------


def debug_data(root: Path) -> tuple[Path, Path]:
    """Emoji shards, a BPE model and token shards from a debug dVAE (the tests' recipe), built once under root."""
    shards, tok, tokens = root / "shards", root / "tok", root / "tokens"
    if (tokens / "manifest.json").is_file():
        return tokens, tok / "bpe.model"
    from megadalle.config import Data
    from megadalle.data.emoji_shards import build_emoji_shards
    from megadalle.data.loader import captions
    from megadalle.models.tokenizer import train_bpe

    shutil.rmtree(root, ignore_errors=True)
    data = Data(image_size=32, limit_per_source=300, shard_max_samples=128, val_percent=10, zeroshot_percent=30)
    build_emoji_shards(data, shards, seed=1, progress=False)
    tok.mkdir(parents=True)
    train_bpe(captions(str(shards)), tok / "bpe", vocab_size=300)
    py = sys.executable
    subprocess.run([py, "megadalle/train.py", "--config", "megadalle/configs/dvae_debug.toml",
                    f"--data.shards={shards}", f"--job.run_root={root}", "--train.steps=3", "--train.eval_every=0",
                    "--logging.progress=off"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
    ckpt = root / "dvae_debug" / "checkpoints"
    subprocess.run([py, "tools/encode_shards.py", "--checkpoint", str(ckpt), "--shards", str(shards),
                    "--out", str(tokens)], cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return tokens, tok / "bpe.model"


def train_runs(out: Path, steps: int, port: int, rank: int, start_iter: int) -> dict:
    tokens, bpe = debug_data(out / "data")
    curves = {}
    for name, extra in (("uncompressed", ["--powersgd.start_iter=1000000000"]),
                        ("powersgd", [f"--powersgd.rank={rank}", f"--powersgd.start_iter={start_iter}"])):  # fmt: skip
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        argv = [sys.executable, "megadalle/train.py", "--config", "megadalle/configs/prior_debug.toml",
                f"--prior.tokens={tokens}", f"--tokenizer.model_path={bpe}", f"--job.run_root={out / 'runs'}",
                f"--job.name={name}", f"--train.steps={steps}", "--train.micro_batch_size=2", "--train.eval_every=0",
                "--optim.ema_decay=0", "--logging.progress=off", "--checkpoint.every=0",
                "--optim.lr_min=1e-4", f"--prior.lr_decay_steps={steps}",
                "--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--powersgd.enabled=true",
                "--parallel.gpus_per_node=2", *extra]  # fmt: skip
        t0 = time.time()
        launch(argv, port, out, f"train_{name}")
        lines = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        recs = [r for r in map(json.loads, lines) if r["kind"] == "train"]
        curves[name] = {"loss": [r["loss"] for r in recs], "seconds": time.time() - t0}
    return curves


def plot(curves: dict, path: Path, rate: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(range(1, len(c["loss"]) + 1), c["loss"], label=f"{name} ({c['seconds']:.0f} s)", alpha=0.8)
    ax.set_xlabel("update")
    ax.set_ylabel("training loss (debug prior)")
    ax.set_title(f"PowerSGD vs uncompressed across 2 node groups x 2, link {rate}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="1gbit", help="tc rate of the link between the node groups")
    ap.add_argument("--d", type=int, default=512, help="width of the synthetic shards (1p3b: 2048)")
    ap.add_argument("--layers", type=int, default=4, help="layers of synthetic shards (1p3b: 24)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200, help="updates of the debug prior (0: no training part)")
    ap.add_argument("--train-rank", type=int, default=16,
                    help="powersgd.rank of the debug prior's run (d 64: 16 is the 12B model's r/d)")  # fmt: skip
    ap.add_argument("--start-iter", type=int, default=0, help="powersgd.start_iter of the debug prior's run")
    ap.add_argument("--out", default="build/bench_powersgd")
    ap.add_argument("--worker-sync", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = (REPO / a.out).resolve()
    rank_r = max(2, round(896 * a.d / 3968))
    if a.worker_sync:
        sync_worker(a.d, a.layers, rank_r, a.iters, out)
        return 0
    if not available():
        print("needs root with ip and tc (network namespaces, a veth pair, a tc rate limit)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    from megadalle.engine.distributed import free_port

    link_up(a.rate)
    try:
        argv_sync = [sys.executable, "tools/bench_powersgd.py", "--worker-sync", f"--d={a.d}", f"--layers={a.layers}",
                     f"--iters={a.iters}", f"--out={out}"]  # fmt: skip
        launch(argv_sync, free_port(), out, "sync")
        sync = json.loads((out / "sync.json").read_text())
        curves = train_runs(out, a.steps, free_port(), a.train_rank, a.start_iter) if a.steps else {}
    finally:
        link_down()
    summary = {"rate": a.rate, "d": a.d, "layers": a.layers, "rank": rank_r, "sync": sync,
               "sync_speedup": sync["uncompressed"] / sync["powersgd"]}  # fmt: skip
    if curves:
        tail = {k: sum(c["loss"][-10:]) / 10 for k, c in curves.items()}
        summary["train"] = {"steps": a.steps, "rank": a.train_rank, "start_iter": a.start_iter,
                            "final_loss_mean_last10": tail,
                            "relative_difference": tail["powersgd"] / tail["uncompressed"] - 1,
                            "seconds": {k: c["seconds"] for k, c in curves.items()}}  # fmt: skip
        plot(curves, out / "loss_curves.png", a.rate)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
