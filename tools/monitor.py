#!/usr/bin/env python
"""A live or finished training run at a glance, with alarms for an operator (or a cron job) to act on.

    python tools/monitor.py outputs/prior_12b [--json] [--stall-s 600] [--silent-s 300]

Reads the run folder train.py writes: `metrics.jsonl` (one JSON line per update, "end" / "stop" lines when the
run finished or stopped on a signal) and `status/rank<R>.json` (every rank's host, pid, step, state and the time
it last wrote, renewed every 10 s by a thread of the rank while it lives). Prints the state, the last step of
the total, loss, lr, throughput, MFU, the time left, and then the alarms:
- stalled: a running run whose last JSON line is older than --stall-s (default: 20 median update times, at least
  5 minutes);
- NaN burst: --nan-max or more non-finite losses or gradient norms in the last --window updates;
- skip burst: --skip-max or more updates skipped for fp16 overflow, or more than --skip-frac of the samples
  skipped by the data stream, in the last --window updates;
- silent ranks: ranks of a running run whose status is older than --silent-s, named with host and pid;
- not resumed: a run stopped by SIGUSR1 for a requeue more than --requeue-s ago without a new update.
Exit status: 0 without alarms, 1 with alarms, 2 when the folder holds no run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file; a torn last line (the run is writing it) is left out."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _total_steps(run: Path) -> int | None:
    config = run / "config.toml"
    if not config.is_file():
        return None
    import tomllib

    return int(tomllib.loads(config.read_text()).get("train", {}).get("steps", 0)) or None


def summarise(run: Path, a: argparse.Namespace, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    lines = read_lines(run / "metrics.jsonl")
    train = [m for m in lines if m.get("kind") == "train"]
    if not train:
        return {"run": str(run), "state": "no training steps yet", "alarms": []}
    last = train[-1]
    final = next((m for m in reversed(lines) if m.get("kind") in ("end", "stop")), None)
    if final is not None and final["step"] < last["step"]:
        final = None  # a stop line of an earlier part of a resumed run
    state = "done" if final and final["kind"] == "end" else f"stopped ({final['reason']})" if final else "running"
    recent = train[-a.window :]
    step_times = [m["step_time_s"] for m in recent if _finite(m.get("step_time_s"))]
    median = statistics.median(step_times) if step_times else None
    total = _total_steps(run)
    out: dict[str, Any] = {
        "run": str(run),
        "state": state,
        "step": last["step"],
        "steps": total,
        "loss": last.get("loss"),
        "lr": last.get("lr"),
        "median_step_s": median,
        "images_per_s": statistics.median([m["images_per_s"] for m in recent if _finite(m.get("images_per_s"))] or [0]),
        "last_line_age_s": round(now - last["time"], 1),
    }
    for key in ("tokens_per_s", "tflops", "mfu", "memory_mb"):
        if _finite(last.get(key)):
            out[key] = last[key]
    if total and median and state == "running":
        out["eta_h"] = round((total - last["step"]) * median / 3600, 2)
    alarms: list[str] = []
    stall_s = a.stall_s or max(300.0, 20 * (median or 0))
    if state == "running" and now - last["time"] > stall_s:
        alarms.append(f"stalled: no update for {now - last['time']:.0f} s (threshold {stall_s:.0f} s) after step "
                      f"{last['step']}")  # fmt: skip
    if final and final["kind"] == "stop" and "USR1" in final.get("reason", "") and now - final["time"] > a.requeue_s:
        alarms.append(f"not resumed: stopped for a requeue {now - final['time']:.0f} s ago at step {final['step']} "
                      "(the requeue failed, or the job waits in the queue)")  # fmt: skip
    bad = [
        m["step"] for m in recent if not _finite(m.get("loss")) or ("grad_norm" in m and not _finite(m["grad_norm"]))
    ]
    if len(bad) >= a.nan_max:
        alarms.append(f"NaN burst: {len(bad)} non-finite losses or gradient norms in the last {len(recent)} updates "
                      f"(steps {bad[:5]}{' ...' if len(bad) > 5 else ''})")  # fmt: skip
    first = recent[0]
    skipped_steps = int(last.get("skipped_steps", 0)) - int(first.get("skipped_steps", 0))
    if skipped_steps >= a.skip_max:
        alarms.append(f"skip burst: {skipped_steps} updates skipped for fp16 overflow in the last {len(recent)}")
    skipped = int(last.get("skipped_samples", 0)) - int(first.get("skipped_samples", 0))
    seen = sum(m.get("images_per_s", 0) * m.get("step_time_s", 0) for m in recent[1:])
    if seen and skipped / seen > a.skip_frac:
        alarms.append(f"skip burst: the data streams skipped {skipped} samples in the last {len(recent)} updates "
                      f"({skipped / seen:.1%} of those read)")  # fmt: skip
    ranks = []
    for path in sorted((run / "status").glob("rank*.json")):
        try:
            ranks.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    out["ranks"] = len(ranks)
    if state == "running":
        silent = [r for r in ranks if r.get("state") in ("started", "training", "checkpointing", "evaluating")
                  and now - r["time"] > a.silent_s]  # fmt: skip
        for r in silent:
            alarms.append(f"silent rank {r['rank']} ({r['host']} pid {r['pid']}): last heard {now - r['time']:.0f} s "
                          f"ago at step {r['step']} ({r['state']})")  # fmt: skip
    out["alarms"] = alarms
    return out


def _line(s: dict[str, Any]) -> str:
    parts = [f"{s['run']}: {s['state']}"]
    if "step" in s:
        parts.append(f"step {s['step']}" + (f"/{s['steps']}" if s.get("steps") else ""))
        for key, fmt in (("loss", ".4g"), ("lr", ".3g"), ("median_step_s", ".3g"), ("images_per_s", ".4g"),
                         ("tokens_per_s", ".4g"), ("mfu", ".1%"), ("eta_h", "g")):  # fmt: skip
            if isinstance(s.get(key), (int, float)):
                parts.append(f"{key} {s[key]:{fmt}}")
        parts.append(f"{s.get('ranks', 0)} ranks")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the run folder (<job.run_root>/<job.name>)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ap.add_argument("--window", type=int, default=100, help="recent updates the burst alarms look at")
    ap.add_argument("--stall-s", type=float, default=0.0, help="seconds without an update (0: 20 median updates)")
    ap.add_argument("--silent-s", type=float, default=300.0, help="seconds a rank may go without a status")
    ap.add_argument("--requeue-s", type=float, default=3600.0, help="seconds a run stopped for a requeue may wait")
    ap.add_argument("--nan-max", type=int, default=3, help="non-finite losses in the window that raise an alarm")
    ap.add_argument("--skip-max", type=int, default=10, help="fp16-skipped updates in the window that raise one")
    ap.add_argument("--skip-frac", type=float, default=0.01, help="share of samples skipped in the window")
    a = ap.parse_args(argv)
    if not (a.run / "metrics.jsonl").is_file():
        print(f"monitor: no metrics.jsonl in {a.run}", file=sys.stderr)
        return 2
    s = summarise(a.run, a)
    if a.json:
        print(json.dumps(s, indent=1))
    else:
        print(_line(s))
        for alarm in s["alarms"]:
            print(f"ALARM {alarm}")
    return 1 if s["alarms"] else 0


if __name__ == "__main__":
    sys.exit(main())
