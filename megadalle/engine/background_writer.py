"""The background writer of `checkpoint.async_save` (engine/checkpoint.py's Checkpointer): a thread that runs queued
writes in order, and the host memory the snapshots it writes are staged in. It knows no file names."""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch


class Staging:
    """Host memory for the snapshots of `checkpoint.async_save`, reused from one save to the next (the previous one
    is written before the next starts): the tensors of a save are taken in the same order every time, so the i-th
    buffer of this save fits the i-th of the last one. Pinned where the tensors come from a GPU, so that the copy
    runs at full speed; that pinned memory stays held for the next save (the planner's `async_host_bytes`)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.used = 0

    def start(self) -> None:
        self.used = 0

    def copy(self, obj: Any) -> Any:
        """`obj` with every tensor copied into a staging buffer and everything else deep-copied."""
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # the same mapping type (DeepSpeed's dicts, defaultdicts, OrderedDicts)
            out.clear()
            out.update((k, self.copy(v)) for k, v in obj.items())
            return out
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self.copy(v) for v in obj)
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        i, self.used = self.used, self.used + 1
        if i < len(self.buffers):
            b = self.buffers[i]
            if b.shape == t.shape and b.dtype == t.dtype:
                return b.copy_(t.detach())
        b = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda").copy_(t.detach())
        if i < len(self.buffers):
            self.buffers[i] = b
        else:
            self.buffers.append(b)
        return b


class BackgroundWriter:
    """A background thread that runs the queued writes in order; the first error stops it and is kept."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.staging = Staging()
        threading.Thread(target=self._run, name="checkpoint-writer", daemon=True).start()

    def submit(self, job: Callable[[], Any]) -> None:
        self._jobs.put(job)

    def idle(self) -> bool:
        return self._jobs.unfinished_tasks == 0

    def wait(self) -> None:
        self._jobs.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self.error is None:
                    job()
            except BaseException as e:  # reported by the loop (Checkpointer.observe / wait), on every rank
                self.error = e
            finally:
                self._jobs.task_done()
