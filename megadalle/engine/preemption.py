"""Stopping on a signal with a checkpoint: SIGUSR1 (Slurm's `--signal=USR1@180`: the time limit is 3 minutes
away) and SIGTERM (preemption, `scancel`) only set a flag. The training loop sums the flags over all ranks with
the update's statistics (`flags()`), so every rank stops after the same update, saves a checkpoint and exits;
after a signal named in `requeue_on` (USR1 by default) rank 0 also puts the job back in Slurm's queue
(`scontrol requeue`), where it resumes from that checkpoint. SIGTERM does not requeue by default: a cancelled job
must stay cancelled, and Slurm requeues preempted jobs itself (PreemptMode=REQUEUE).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger("megadalle")

SIGNALS = ("USR1", "TERM")
_KEY = "__signal_{}__"


class StopSignals:
    def __init__(self, requeue_on: tuple[str, ...] | list[str] = ("USR1",)) -> None:
        unknown = set(requeue_on) - set(SIGNALS)
        if unknown:
            raise ValueError(f"checkpoint.requeue_on: {sorted(unknown)} not among {list(SIGNALS)}")
        self.requeue_on = tuple(requeue_on)
        self.received: set[str] = set()
        self.stopped_by: list[str] = []  # the agreed signals the training loop stopped on
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.received.add(signal.Signals(signum).name[3:])  # "SIGUSR1" -> "USR1"

    def flags(self) -> dict[str, float]:
        """This rank's flags, to be summed over ranks with the update's statistics."""
        return {_KEY.format(name): float(name in self.received) for name in SIGNALS}

    @staticmethod
    def agreed(summed: dict[str, float]) -> list[str]:
        """The signals some rank received, from the summed flags (which are removed from `summed`)."""
        return [name for name in SIGNALS if summed.pop(_KEY.format(name), 0.0) > 0]

    def requeue(self, signals: list[str]) -> bool:
        """Rank 0, after the checkpoint: put the job back in Slurm's queue when a signal asks for it. Slurm
        ends the job's processes as part of the requeue."""
        if not set(signals) & set(self.requeue_on):
            return False
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            log.warning("not running under Slurm: nothing to requeue; run the same command again to resume")
            return False
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode != 0:
            log.error(f"scontrol requeue {job} failed ({proc.returncode}): {proc.stderr.strip()}; resubmit to resume")
            return False
        log.warning(f"requeued Slurm job {job}: it resumes from the checkpoint just written")
        return True
