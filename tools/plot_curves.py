#!/usr/bin/env python
"""Training curves of the demo's runs in one PNG.

    python tools/plot_curves.py outputs/dvae_small outputs/prior_small outputs/clip_small --out outputs/demo/curves.png

Each argument is a run folder or its metrics.jsonl. One panel per run: the training loss against the update
(raw, light, and smoothed), with the evaluation points where the run has any (each split's whole loss,
`<split>_loss`, on the loss axis; PSNR or R@1 on a second axis). One more panel for the dVAE's codebook use
where a run logged it: the eval metrics `codebook_used_fraction` and `codebook_perplexity`, and
`batch_codes_used_fraction` of the training lines.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402

EVAL_LOSS = re.compile(r"[a-z]+_loss")
"""Eval metrics on the loss axis: a split's whole loss (val_loss, zeroshot_loss), not its parts (val_text_loss)."""
EVAL_SECOND_AXIS = ("psnr_db", "val_i2t_r1", "zeroshot_i2t_r1")
"""Eval metrics on a second axis of a loss panel (not losses, but the run's headline figure)."""
CODEBOOK_EVAL = ("codebook_used_fraction", "codebook_perplexity")
CODEBOOK_TRAIN = "batch_codes_used_fraction"


def read_metrics(path: Path) -> dict[str, dict[int, dict]]:
    """{"train": {step: record}, "eval": {step: record}} of a metrics.jsonl. A resumed run may log a step twice
    (after a rollback); the later line wins. Unreadable lines (a run killed mid-write) are skipped."""
    out: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") in out and isinstance(rec.get("step"), int):
            out[rec["kind"]][rec["step"]] = rec
    return out


def series(records: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the finite numbers logged under `key` (non-finite ones are logged as strings)."""
    pts = [(s, float(r[key])) for s, r in sorted(records.items()) if isinstance(r.get(key), (int, float))]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with the start-up bias removed (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def metrics_file(arg: str) -> Path:
    path = Path(arg)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}")
    return path


def plot(paths: list[Path], out: Path) -> Path:
    runs = [(p.parent.name, read_metrics(p)) for p in paths]
    codebook = [
        (name, m) for name, m in runs if any(k in r for r in m["eval"].values() for k in CODEBOOK_EVAL)
        or any(CODEBOOK_TRAIN in r for r in m["train"].values())
    ]  # fmt: skip
    n = len(runs) + (1 if codebook else 0)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (name, m) in zip(flat, runs):
        _loss_panel(ax, name, m)
    if codebook:
        _codebook_panel(flat[len(runs)], codebook)
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def _loss_panel(ax, name: str, m: dict[str, dict[int, dict]]) -> None:
    steps, loss = series(m["train"], "loss")
    ax.set_title(f"{name}: training loss")
    ax.set_xlabel("update")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if steps:
        ax.plot(steps, loss, color="C0", alpha=0.25, linewidth=1, label="train (raw)")
        ax.plot(steps, smooth(loss, 0.9 if len(loss) > 50 else 0.6), color="C0", linewidth=2, label="train (smoothed)")
    else:
        ax.text(0.5, 0.5, "no training lines", ha="center", va="center", transform=ax.transAxes)
    eval_keys = sorted({k for r in m["eval"].values() for k in r if EVAL_LOSS.fullmatch(k)})
    for i, key in enumerate(eval_keys):
        s, v = series(m["eval"], key)
        ax.plot(s, v, "o", color=f"C{i + 1}", markersize=7, label=f"eval {key}")
    handles, labels = ax.get_legend_handles_labels()
    second = [k for k in EVAL_SECOND_AXIS if any(k in r for r in m["eval"].values())]
    if second:
        ax2 = ax.twinx()
        for i, key in enumerate(second):
            s, v = series(m["eval"], key)
            ax2.plot(s, v, "D--", color=f"C{len(eval_keys) + i + 1}", markersize=6, label=f"eval {key}")
        ax2.set_ylabel(", ".join(second))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best")


def _codebook_panel(ax, runs: list[tuple[str, dict[str, dict[int, dict]]]]) -> None:
    ax.set_title("dVAE codebook use")
    ax.set_xlabel("update")
    ax.set_ylabel("fraction of the codebook used")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.set_ylabel("codebook perplexity")
    for i, (name, m) in enumerate(runs):
        s, v = series(m["train"], CODEBOOK_TRAIN)
        if s:
            ax.plot(s, v, color=f"C{2 * i}", alpha=0.6, label=f"{name} train {CODEBOOK_TRAIN}")
        s, v = series(m["eval"], "codebook_used_fraction")
        if s:
            ax.plot(s, v, "o-", color=f"C{2 * i}", label=f"{name} eval codebook_used_fraction")
        s, v = series(m["eval"], "codebook_perplexity")
        if s:
            # hollow: a fraction point behind it (the other axis) stays visible
            ax2.plot(s, v, "s--", color=f"C{2 * i + 1}", mfc="none", ms=9, label=f"{name} eval codebook_perplexity")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (outputs/<job.name>) or their metrics.jsonl files")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        out = plot([metrics_file(r) for r in args.runs], Path(args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_curves: error: {e}", file=sys.stderr)
        return 2
    print(f"curves: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
