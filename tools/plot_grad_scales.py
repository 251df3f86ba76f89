#!/usr/bin/env python
"""The per-resblock gradient scales of an fp16 run over time, like the paper's Figure 12.

    python tools/plot_grad_scales.py outputs/prior_12b --out outputs/prior_12b/grad_scales.png

Reads the run's metrics.jsonl (or the file given), whose train lines carry `grad_scale_log2` (one log2 scale per
resblock, attention and MLP alternating) every `train.log_every` updates. One line per resblock, coloured by
depth, attention solid and MLP dashed, with the skipped updates marked on the step axis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402
from plot_curves import read_metrics  # noqa: E402


def scales(path: Path) -> tuple[list[int], list[list[float]], list[int]]:
    """(steps, per-step log2 scales (one list per step), steps whose update was skipped)."""
    train = read_metrics(path)["train"]
    steps, rows, skipped, prev = [], [], [], 0
    for step, rec in sorted(train.items()):
        n = rec.get("grad_scale_skipped_updates")
        if isinstance(n, int) and n > prev:
            skipped.append(step)
            prev = n
        if isinstance(rec.get("grad_scale_log2"), list):
            steps.append(step)
            rows.append([float(v) for v in rec["grad_scale_log2"]])
    return steps, rows, skipped


def plot(path: Path, out: Path) -> int:
    steps, rows, skipped = scales(path)
    if not rows:
        print(f"plot_grad_scales: {path} has no grad_scale_log2 (not an fp16 per-resblock run?)", file=sys.stderr)
        return 1
    n = len(rows[0])
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    cmap = plt.get_cmap("viridis")
    for b in range(n):
        layer, kind = divmod(b, 2)
        ax.plot(steps, [r[b] for r in rows], color=cmap(b / max(1, n - 1)), lw=1.2, ls="-" if kind == 0 else "--",
                label=f"layer {layer + 1} {'attn' if kind == 0 else 'mlp'}" if n <= 16 else None)  # fmt: skip
    for s in skipped:
        ax.axvline(s, color="red", alpha=0.25, lw=0.8)
    ax.set_xlabel("update")
    ax.set_ylabel("log2 gradient scale")
    ax.set_title(f"{path.parent.name if path.name == 'metrics.jsonl' else path.name}: per-resblock gradient scales "
                 f"(skipped updates in red: {len(skipped)})")  # fmt: skip
    if n <= 16:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out}: {n} resblocks, {len(steps)} points, skipped updates: {len(skipped)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder or its metrics.jsonl")
    p.add_argument("--out", default="", help="PNG path (default: <run>/grad_scales.png)")
    args = p.parse_args(argv)
    path = Path(args.run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    out = Path(args.out) if args.out else path.parent / "grad_scales.png"
    return plot(path, out)


if __name__ == "__main__":
    sys.exit(main())
