"""Dead-rank detection: a job whose rank died ends within `timeout_s` with a message naming the rank, instead of
hanging in its next collective.

Every rank bumps a counter in the job's rendezvous store (the TCPStore rank 0 serves at MASTER_ADDR:MASTER_PORT,
over a connection of its own) every `timeout_s / 10` seconds from a daemon thread. Rank 0 watches every rank's
counter, the others watch rank 0's. A counter that has not moved for `timeout_s` (a killed, stopped or wedged
process), or a store that cannot be reached (rank 0 is gone), makes the watcher log which rank (host, pid) and
end its own process with EXIT_RANK_LOST, so that the launcher (srun --kill-on-bad-exit, torchrun) ends the job.
A rank that is alive but stuck in a collective keeps beating: the collective timeout covers it.
`silent()` names the ranks that stopped beating, for the message of a collective that failed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("megadalle")

EXIT_RANK_LOST = 3
"""The exit code of a process that ended itself because another rank died."""

_PREFIX = "megadalle/heartbeat/"


class Heartbeat:
    def __init__(self, rank: int, world: int, timeout_s: float) -> None:
        if timeout_s < 5:
            raise ValueError(f"a heartbeat timeout of {timeout_s} s is below 5 s")
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.interval = max(0.2, timeout_s / 10)
        self.addr, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.store = dist.TCPStore(self.addr, self.port, world_size=None, is_master=False,
                                   timeout=timedelta(seconds=max(10.0, timeout_s)))  # fmt: skip
        self.store.set(f"{_PREFIX}who/{rank}", f"{socket.gethostname()} pid {os.getpid()}")
        self.stopped = threading.Event()
        self.ending = False
        self.lock = threading.Lock()  # one thread at a time on the store connection
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.thread.start()
        return self

    def closing(self) -> None:
        """The job is ending: keep beating and watching for silent ranks, but a store that goes away (rank 0
        leaving after the last barrier) is no longer a death."""
        self.ending = True

    def stop(self) -> None:
        """Before the job's last barrier: a rank that finishes first must not look dead to the others. The thread
        and its store connection end here, not in the interpreter's teardown."""
        self.stopped.set()
        self.thread.join(timeout=self.interval + 5)
        with self.lock:
            self.store = None

    def _count(self, r: int) -> int:
        with self.lock:
            return int(self.store.add(f"{_PREFIX}{r}", 0))

    def who(self, r: int) -> str:
        try:
            with self.lock:
                return f"rank {r} ({self.store.get(f'{_PREFIX}who/{r}').decode()})"
        except Exception:
            return f"rank {r}"

    def _run(self) -> None:
        watched = list(range(self.world)) if self.rank == 0 else [0]
        seen = {r: (-1, time.monotonic()) for r in watched}
        while not self.stopped.wait(self.interval):
            try:
                with self.lock:
                    self.store.add(f"{_PREFIX}{self.rank}", 1)
                now = time.monotonic()
                for r in watched:
                    count = self._count(r)
                    if count != seen[r][0]:
                        seen[r] = (count, now)
                    elif now - seen[r][1] > self.timeout_s and not self.stopped.is_set():
                        self._lost(f"{self.who(r)} sent no heartbeat for {now - seen[r][1]:.0f} s: it died or is "
                                   "stopped; ending this rank so that the job ends")  # fmt: skip
            except Exception as e:  # the store is served by rank 0: unreachable means rank 0 is gone
                if self.ending or self.stopped.is_set():
                    return
                if self.rank != 0:
                    self._lost(f"the rendezvous store of rank 0 at {self.addr}:{self.port} cannot be reached "
                               f"({type(e).__name__}): rank 0 died; ending this rank so that the job ends")  # fmt: skip
                self._lost(f"the heartbeat failed on rank 0 ({type(e).__name__}: {e}); ending this rank")

    def _lost(self, message: str) -> None:
        log.error(f"rank {self.rank}: {message}")
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os._exit(EXIT_RANK_LOST)

    def silent(self, wait_s: float | None = None) -> list[str]:
        """The ranks whose counters do not move over `wait_s` (two beats by default), as "rank R (host pid P)"."""
        try:
            before = {r: self._count(r) for r in range(self.world)}
            time.sleep(wait_s if wait_s is not None else 2.5 * self.interval)
            return [self.who(r) for r in range(self.world) if r != self.rank and self._count(r) == before[r]]
        except Exception:
            return [self.who(0) + " (the store host)"] if self.rank != 0 else []
