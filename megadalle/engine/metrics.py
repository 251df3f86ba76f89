"""Operator logs: one JSON line per step (rank 0, `<run>/metrics.jsonl`, mirrored as TensorBoard events in
`<run>/tensorboard/`), a readable rank-0 line every N steps, every rank's log in `<run>/logs/rank<R>.log`, and
every rank's liveness in `<run>/status/rank<R>.json` (tools/monitor.py reads them)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("megadalle")


FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(message)s"


def setup_logging(level: str, rank: int, log_dir: Path | None = None) -> None:
    """Console: rank 0 at `level`, the others warnings and errors only. With `log_dir`, every rank also writes
    everything at `level` to `log_dir/rank<R>.log` (appended across restarts)."""
    fmt = logging.Formatter(FORMAT.format(rank=rank))
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_dir / f"rank{rank:05d}.log")
        file.setFormatter(fmt)
        handlers.append(file)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=handlers, force=True)


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan; keep them visible as strings
    return v


class MetricsLogger:
    def __init__(
        self, path: Path | None, every: int, readable: list[str], append: bool = False, tensorboard: Path | None = None
    ) -> None:
        """`append`: a resumed run continues its file; a fresh run starts a new one. `tensorboard`: a folder for
        TensorBoard event files of the same numbers."""
        self.path = path
        self.every = max(1, every)
        self.readable = readable
        self._f = open(path, "a" if append else "w", buffering=1) if path is not None else None  # line-buffered
        self._tb = None
        if tensorboard is not None and path is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard))
        self.t0 = time.time()

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train", force: bool = False) -> None:
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), "elapsed_s": round(time.time() - self.t0, 2)}
        rec.update({k: _clean(v) for k, v in metrics.items()})
        if self._f is not None:
            self._f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        if force or kind != "train" or step % self.every == 0:
            keys = self.readable if kind == "train" else list(metrics)
            parts = [f"{k} {_fmt(rec[k])}" for k in keys if k in rec]
            log.info(f"{kind} step {step}: " + " | ".join(parts))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


class RankStatus:
    """This rank's liveness for tools/monitor.py: `status/rank<R>.json` with host, pid, step, state and time,
    written at every change of state and renewed every `every_s` seconds by a daemon thread, so a rank
    busy in a long checkpoint or evaluation still shows alive (a main thread that hangs shows as a stalled run:
    no new JSON lines)."""

    def __init__(self, folder: Path, rank: int, every_s: float = 10.0) -> None:
        import os
        import socket
        import threading

        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.every_s = folder / f"rank{rank:05d}.json", every_s
        self.record: dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "step": 0,
                                       "state": "started"}  # fmt: skip
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self._write()
        self.thread = threading.Thread(target=self._renew, name="rank-status", daemon=True)
        self.thread.start()

    def update(self, step: int, state: str = "training") -> None:
        with self.lock:
            changed = state != self.record["state"]
            self.record.update(step=step, state=state)
        if changed:  # a new step alone waits for the next renewal
            self._write()

    def _write(self) -> None:
        with self.lock:
            record = {**self.record, "time": round(time.time(), 3)}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(self.path)

    def _renew(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self._write()
            except OSError:  # a full or unmounted disk: the training goes on, the monitor will say so
                pass

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self._write()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
