"""Operator logs: one JSON line per step (rank 0, `<run>/metrics.jsonl`) and a readable rank-0 line."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("megadalle")


def setup_logging(level: str, rank: int) -> None:
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stdout, force=True)
    if rank != 0:
        logging.getLogger("megadalle").setLevel(logging.WARNING)


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan; keep them visible as strings
    return v


class MetricsLogger:
    def __init__(self, path: Path | None, every: int, readable: list[str], append: bool = False) -> None:
        """`append`: a resumed run continues its file; a fresh run starts a new one."""
        self.path = path
        self.every = max(1, every)
        self.readable = readable
        self._f = open(path, "a" if append else "w", buffering=1) if path is not None else None  # line-buffered
        self.t0 = time.time()

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train", force: bool = False) -> None:
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), "elapsed_s": round(time.time() - self.t0, 2)}
        rec.update({k: _clean(v) for k, v in metrics.items()})
        if self._f is not None:
            self._f.write(json.dumps(rec) + "\n")
        if force or kind != "train" or step % self.every == 0:
            keys = self.readable if kind == "train" else list(metrics)
            parts = [f"{k} {_fmt(rec[k])}" for k in keys if k in rec]
            log.info(f"{kind} step {step}: " + " | ".join(parts))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
