#!/usr/bin/env python
"""One training run's curves in one PNG, for an operator's look at a live or finished run.

    python tools/plot_run.py outputs/prior_12b [--out outputs/prior_12b/run.png]

Panels from `metrics.jsonl`, each where the run logged it: the loss (and the prior's text and image losses; the
evaluation losses as points), the learning rate, the gradient norm, throughput (images/s, and tokens/s or MFU on
a second axis), skipped updates (fp16 overflow) and skipped samples (data), the per-resblock gradient scales
(min / max / outside, log2), memory. Steps where the loss was not finite are marked in red on the loss panel.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from monitor import read_lines  # noqa: E402

PANELS: list[tuple[str, list[str], str | None]] = [
    ("loss", ["loss", "text_loss", "image_loss"], None),
    ("learning rate", ["lr"], None),
    ("gradient norm", ["grad_norm"], None),
    ("throughput", ["images_per_s"], "tokens_per_s"),
    ("skipped", ["skipped_steps"], "skipped_samples"),
    ("log2 gradient scales", ["grad_scale_log2_min", "grad_scale_log2_max", "grad_scale_log2_outside"], None),
    ("memory (MB)", ["memory_mb"], None),
]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(m["step"], m[key]) for m in records if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot(run: Path, out: Path) -> Path:
    lines = read_lines(run / "metrics.jsonl")
    train = [m for m in lines if m.get("kind") == "train"]
    evals = [m for m in lines if m.get("kind") == "eval"]
    if not train:
        raise ValueError(f"{run / 'metrics.jsonl'} holds no training steps")
    panels = [p for p in PANELS if any(_series(train, k)[0] for k in p[1])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.3 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys, second) in zip(axes[:, 0], panels):
        for key in keys:
            xs, ys = _series(train, key)
            if xs:
                ax.plot(xs, ys, lw=1, label=key)
        if title == "loss":
            for key in sorted({k for m in evals for k in m if k.endswith("_loss")}):
                xs, ys = _series(evals, key)
                ax.plot(xs, ys, "o", ms=4, label=f"eval {key}")
            bad = [
                m["step"] for m in train if not isinstance(m.get("loss"), (int, float)) or not math.isfinite(m["loss"])
            ]
            for step in bad:
                ax.axvline(step, color="red", alpha=0.4, lw=1)
        if second is not None:
            key = second if _series(train, second)[0] else "mfu" if second == "tokens_per_s" else None
            if key and _series(train, key)[0]:
                ax2 = ax.twinx()
                ax2.plot(*_series(train, key), lw=1, color="tab:orange", label=key)
                ax2.set_ylabel(key, color="tab:orange")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("update")
    fig.suptitle(f"{run.name}: {train[-1]['step']} updates", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the run folder (<job.run_root>/<job.name>)")
    ap.add_argument("--out", type=Path, default=None, help="the PNG (default: RUN/run.png)")
    a = ap.parse_args(argv)
    try:
        path = plot(a.run, a.out or a.run / "run.png")
    except (OSError, ValueError) as e:
        print(f"plot_run: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
