"""A resumable stream of training batches from shards anywhere (issue 13): local paths, file:// or s3://.

Every epoch, the shard list is shuffled by (seed, epoch) and dealt to the world's ranks and then to each rank's
DataLoader workers (`s3.epoch_shards`), so an epoch reads every sample once; a set with fewer shards than readers
is split by sample instead (every reader reads every shard and keeps its own residue of the sample index). Inside
a worker, samples become items (`make_item(sample)`, where sample["__epoch__"] is the epoch: decode, augment; an
item that fails is skipped and counted against its shard), are shuffled and batched; each batch carries the
position its worker had read to: (epoch, shard index in that worker's epoch list, samples of the shard
delivered). `Stream` keeps the latest position of each worker and restarts every worker there.

Shuffling permutes each shard's samples in chunks of `shuffle_buffer`, each chunk by a generator seeded from
its place (seed, rank, epoch, shard, chunk), so a resume re-reads the chunk it stopped in and delivers exactly the
rest: no sample is repeated or skipped (the window is zero). Skip counts are part of the state.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from megadalle.data.s3 import S3Error, S3Settings, epoch_shards, samples


class StreamStateMismatchError(ValueError):
    """A saved position that does not apply to this stream (another rank, world, worker count or seed)."""


@dataclass(frozen=True)
class Position:
    """How far one worker has read: `sample` samples of shard `shard` of its list for `epoch`."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0


class _Worker(torch.utils.data.IterableDataset):
    def __init__(self, stream: Stream) -> None:
        self.s = stream

    def __iter__(self) -> Iterator[tuple[Any, int, Position, dict[str, int]]]:
        s = self.s
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # the logical worker: a fresh DataLoader asks worker 0 first, but the batch due next (after `delivered`
        # batches dealt round-robin) is logical worker delivered % workers's
        worker = ((info.id if info else 0) + s.delivered) % workers
        start = s.positions.get(worker, Position())
        skips: Counter = Counter(s.skips)
        batch: list[Any] = []
        epoch = start.epoch
        parts, slot = s.world * workers, s.rank * workers + worker
        by_shard = len(s.urls) >= parts  # else every slot reads every shard and keeps every parts-th sample
        while s.max_epochs is None or epoch < s.max_epochs:
            if by_shard:
                shards = epoch_shards(s.urls, epoch, s.seed, s.rank, s.world, worker, workers)
            else:
                shards = epoch_shards(s.urls, epoch, s.seed, 0, 1)
            first = start.shard if epoch == start.epoch else 0
            for index in range(first, len(shards)):
                done = start.sample if (epoch, index) == (start.epoch, start.shard) else 0
                keep = (1, 0) if by_shard else (parts, slot)
                for n, item in self._shard(shards[index], epoch, index, done, skips, keep):
                    batch.append(item)
                    if len(batch) == s.batch_size:
                        yield s.collate(batch), worker, Position(epoch, index, n), dict(skips)
                        batch = []
            epoch += 1
        if batch:  # a finite stream (max_epochs) delivers everything: the last batch may be short
            yield s.collate(batch), worker, Position(epoch, 0, 0), dict(skips)

    def _shard(
        self, url: str, epoch: int, index: int, done: int, skips: Counter, keep: tuple[int, int]
    ) -> Iterator[tuple[int, Any]]:
        """(samples of the shard delivered so far, item) in delivery order: the shard's samples in chunks of
        `shuffle_buffer`, each chunk permuted by a generator seeded from its place, so a resume after `done`
        delivers exactly the rest; a sample whose item fails is skipped and counted. keep = (parts, slot): only
        the samples whose index in the shard is slot modulo parts (a set with fewer shards than readers)."""
        s, size = self.s, max(1, self.s.shuffle_buffer)

        def corrupt(exn: Exception) -> bool:  # a corrupt member: counted, the shard goes on
            if isinstance(exn, S3Error):  # not corruption: the object could not be read (retries exhausted)
                raise exn
            skips[url] += 1
            return True

        chunk: list[dict] = []
        chunks = 0
        stream = samples([url], s.settings, handler=corrupt)
        while True:
            chunk = list(itertools.islice(stream, size))
            if not chunk:
                return
            base = chunks * size
            chunks += 1
            if base + len(chunk) <= done:
                continue  # delivered before the saved position
            order = list(range(len(chunk)))
            random.Random(f"{s.seed}/{s.rank}/{epoch}/{index}/{chunks}").shuffle(order)
            for k, j in enumerate(order):
                n = base + k + 1
                if n <= done or (base + j) % keep[0] != keep[1]:
                    continue
                sample = chunk[j]
                sample["__epoch__"] = epoch
                try:
                    item = s.make_item(sample)
                except Exception:
                    skips[url] += 1
                    continue
                yield n, item


class Stream:
    """Batches of `make_item(sample)` for one rank, through a DataLoader with `workers` worker processes (0: in
    this process); `state()` / `load_state()` save and restore every worker's position."""

    def __init__(
        self,
        urls: list[str],
        make_item: Callable[[dict[str, Any]], Any],
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        workers: int = 0,
        shuffle_buffer: int = 0,
        collate: Callable[[list[Any]], Any] = list,
        max_epochs: int | None = None,
        settings: S3Settings | None = None,
        prefetch: int = 2,
        skips_out: dict[str, int] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("no shards to stream")
        self.urls, self.make_item, self.batch_size, self.collate = urls, make_item, batch_size, collate
        self.rank, self.world, self.seed, self.workers = rank, world, seed, workers
        self.shuffle_buffer, self.max_epochs, self.prefetch = shuffle_buffer, max_epochs, prefetch
        self.settings = settings or S3Settings()
        self.positions: dict[int, Position] = {}
        self.delivered = 0  # batches handed out (which worker's turn it is)
        self.skips: dict[str, int] = skips_out if skips_out is not None else {}  # shard URL -> samples skipped

    def state(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "workers": self.workers, "seed": self.seed,
                "positions": {w: asdict(p) for w, p in self.positions.items()}, "skips": dict(self.skips),
                "delivered": self.delivered}  # fmt: skip

    def load_state(self, state: dict[str, Any]) -> None:
        saved = (state["rank"], state["world"], state["workers"], state["seed"])
        if saved != (self.rank, self.world, self.workers, self.seed):
            raise StreamStateMismatchError(
                f"loader position saved for rank {saved[0]} of {saved[1]} with {saved[2]} workers and seed "
                f"{saved[3]}; this run is rank {self.rank} of {self.world} with {self.workers} workers and seed "
                f"{self.seed}"
            )
        self.positions = {int(w): Position(**p) for w, p in state["positions"].items()}
        self.skips.update(state.get("skips", {}))
        self.delivered = int(state.get("delivered", 0))

    def __iter__(self) -> Iterator[Any]:
        kwargs = {"prefetch_factor": self.prefetch, "persistent_workers": False} if self.workers else {}
        loader = torch.utils.data.DataLoader(_Worker(self), batch_size=None, num_workers=self.workers, **kwargs)
        for batch, worker, position, skips in loader:
            self.positions[worker] = position
            self.delivered += 1
            for url, n in skips.items():
                self.skips[url] = max(self.skips.get(url, 0), n)
            yield batch
