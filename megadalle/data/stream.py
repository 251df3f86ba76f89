"""A resumable stream of training batches from shards anywhere (issue 13): local paths, file:// or s3://.

Every epoch, the shard list is shuffled by (seed, epoch) and dealt to the world's ranks and then to each rank's
DataLoader workers (`s3.epoch_shards`), so an epoch reads every sample once. Inside a worker, samples are turned
into items (`make_item`: decode, augment, tokenise; an item that fails is skipped and counted against its
shard), shuffled through a buffer, and batched; each batch carries the position its worker had read to: (epoch,
shard index in that worker's epoch list, samples read from the shard). `Stream` keeps the latest position of
each worker and restarts every worker there.

The window (stated here and in the README): a resume repeats no sample; it skips at most `shuffle_buffer +
batch_size - 1` samples per worker (those read but not yet delivered when the position was saved).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from megadalle.data.s3 import S3Settings, epoch_shards, samples


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
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start = s.positions.get(worker, Position())
        rng = random.Random(hash((s.seed, s.rank, worker, start.epoch, start.shard, start.sample)))
        skips: Counter = Counter()
        buffer: list[Any] = []
        batch: list[Any] = []
        epoch = start.epoch
        while s.max_epochs is None or epoch < s.max_epochs:
            shards = epoch_shards(s.urls, epoch, s.seed, s.rank, s.world, worker, workers)
            first = start.shard if epoch == start.epoch else 0
            for index in range(first, len(shards)):
                url, done = shards[index], start.sample if (epoch, index) == (start.epoch, start.shard) else 0

                def skip(exn: Exception, url: str = url) -> bool:  # a corrupt member: counted, the shard goes on
                    skips[url] += 1
                    return True

                for n, sample in enumerate(samples([url], s.settings, handler=skip), start=1):
                    if n <= done:
                        continue  # read before the saved position
                    try:
                        item = s.make_item(sample)
                    except Exception:
                        skips[url] += 1
                        continue
                    buffer.append(item)
                    if len(buffer) <= s.shuffle_buffer:
                        continue
                    batch.append(buffer.pop(rng.randrange(len(buffer))))
                    if len(batch) == s.batch_size:
                        yield s.collate(batch), worker, Position(epoch, index, n), dict(skips)
                        batch = []
            epoch += 1
        rng.shuffle(buffer)  # a finite stream (max_epochs) delivers everything, the last batch maybe short
        rest = batch + buffer
        for i in range(0, len(rest), s.batch_size):
            yield s.collate(rest[i : i + s.batch_size]), worker, Position(epoch, 0, 0), dict(skips)


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
    ) -> None:
        if not urls:
            raise ValueError("no shards to stream")
        self.urls, self.make_item, self.batch_size, self.collate = urls, make_item, batch_size, collate
        self.rank, self.world, self.seed, self.workers = rank, world, seed, workers
        self.shuffle_buffer, self.max_epochs, self.prefetch = shuffle_buffer, max_epochs, prefetch
        self.settings = settings or S3Settings()
        self.positions: dict[int, Position] = {}
        self.skips: dict[str, int] = {}

    def state(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "workers": self.workers, "seed": self.seed,
                "positions": {w: asdict(p) for w, p in self.positions.items()}}  # fmt: skip

    def load_state(self, state: dict[str, Any]) -> None:
        saved = (state["rank"], state["world"], state["workers"], state["seed"])
        if saved != (self.rank, self.world, self.workers, self.seed):
            raise ValueError(f"loader position saved for rank {saved[0]} of {saved[1]} with {saved[2]} workers and "
                             f"seed {saved[3]}; this run is rank {self.rank} of {self.world} with {self.workers} "
                             f"workers and seed {self.seed}")  # fmt: skip
        self.positions = {int(w): Position(**p) for w, p in state["positions"].items()}

    def __iter__(self) -> Iterator[Any]:
        kwargs = {"prefetch_factor": self.prefetch, "persistent_workers": False} if self.workers else {}
        loader = torch.utils.data.DataLoader(_Worker(self), batch_size=None, num_workers=self.workers, **kwargs)
        for batch, worker, position, skips in loader:
            self.positions[worker] = position
            for url, n in skips.items():
                self.skips[url] = max(self.skips.get(url, 0), n)
            yield batch
