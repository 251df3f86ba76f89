"""A resumable stream of training batches from shards anywhere (issue 13): local paths, file:// or s3://.

Every epoch, the shard list is shuffled by (seed, epoch) and dealt to the world's ranks and then to each rank's
DataLoader workers (`s3.epoch_shards`), so an epoch reads every sample once; a set with fewer shards than readers
is split by sample instead (every reader reads every shard and keeps its own residue of the sample index: each
reader then downloads the whole set, so a warning says so). Inside a worker, samples become items
(`make_item(sample)`, where sample["__epoch__"] is the epoch: decode, augment), are shuffled and batched; each
batch carries the position its worker had read to: (epoch, shard index in that worker's epoch list, samples of the
shard delivered). `Stream` keeps the latest position of each worker and restarts every worker there.

Shuffling permutes each shard's samples in chunks of `shuffle_buffer`, each chunk by a generator seeded from
its place (seed, rank, epoch, shard, chunk), so a resume re-reads the chunk it stopped in and delivers exactly the
rest: no sample is repeated or skipped (the window is zero).

Skips: a sample that cannot be used is skipped, never the job stopped: an item that fails (`SkipSampleError(reason)`
names why: an undecodable image, an empty or over-long caption; other exceptions count under their type), a shard
failing its sha256 check (all its samples), corrupt or cut tar data (the samples its manifest record counts that the
tar did not yield; the member it cut counts as its sample's failure). A shard outside a manifest is counted by
img2dataset's `_stats.json` beside it; with neither, a broken tar counts once and a warning says so. Each batch
carries the skips met since the worker's previous batch, by shard and reason, so the counts in a saved state cover
exactly the samples before the saved positions and a resume does not count them twice. `Stream.skips` holds them,
and each shard's are logged in one line when a reader has read it. A shard that cannot be read at all (S3Error after
the retries) is an error, and so is an epoch of a reader that delivered nothing but skips (the data or `make_item`
is wrong).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from megadalle.data.s3 import S3Settings, ShardChecksumError, ShardFetcher, TarDamage, epoch_shards, samples
from megadalle.data.shards import expected_samples

log = logging.getLogger(__name__)


class SkipSampleError(Exception):
    """Raised by a `make_item` for a sample it will not use; the message is the reason the count is kept under."""


@dataclass
class SkipCounter:
    """Samples a stream could not use: shard URL -> reason -> count."""

    shards: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, delta: dict[str, dict[str, int]]) -> None:
        for url, reasons in delta.items():
            mine = self.shards.setdefault(url, {})
            for reason, n in reasons.items():
                mine[reason] = mine.get(reason, 0) + n

    @property
    def total(self) -> int:
        return sum(sum(r.values()) for r in self.shards.values())

    def by_reason(self) -> dict[str, int]:
        out: Counter = Counter()
        for reasons in self.shards.values():
            out.update(reasons)
        return dict(out)


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
        self.uncounted = False  # a shard without a count was met (and said)

    def __iter__(self) -> Iterator[tuple[Any, int, Position, dict[str, dict[str, int]]]]:
        s = self.s
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # the logical worker: a fresh DataLoader asks worker 0 first, but the batch due next (after `delivered`
        # batches dealt round-robin) is logical worker delivered % workers's
        worker = ((info.id if info else 0) + s.delivered) % workers
        start = s.positions.get(worker, Position())
        skips: defaultdict[str, Counter] = defaultdict(Counter)  # met since the last batch handed out
        finished: list[str] = []  # shards read to their end since then
        batch: list[Any] = []
        epoch = start.epoch

        def dealt(epoch: int) -> list[str]:
            if by_shard:
                return epoch_shards(s.urls, epoch, s.seed, s.rank, s.world, worker, workers)
            return epoch_shards(s.urls, epoch, s.seed, 0, 1)

        parts, slot = s.world * workers, s.rank * workers + worker
        by_shard = len(s.urls) >= parts  # else every slot reads every shard and keeps every parts-th sample
        keep = (1, 0) if by_shard else (parts, slot)
        fetcher = ShardFetcher(s.settings, {u: r["sha256"] for u, r in s.records.items() if "sha256" in r})
        try:
            while s.max_epochs is None or epoch < s.max_epochs:
                shards = dealt(epoch)
                first = start.shard if epoch == start.epoch else 0
                delivered, skipped = 0, Counter()  # this epoch's
                for index in range(first, len(shards)):
                    done = start.sample if (epoch, index) == (start.epoch, start.shard) else 0
                    upcoming = shards[index + 1 : index + 1 + s.settings.read_ahead]
                    if len(upcoming) < s.settings.read_ahead and (s.max_epochs is None or epoch + 1 < s.max_epochs):
                        upcoming += dealt(epoch + 1)
                    fetcher.ahead(upcoming)
                    for n, item in self._shard(fetcher, shards[index], epoch, index, done, skips, keep):
                        delivered += 1
                        batch.append(item)
                        if len(batch) == s.batch_size:
                            yield s.collate(batch), worker, Position(epoch, index, n), _take(skips, finished)
                            batch = []
                    finished.append(shards[index])
                    skipped.update(skips[shards[index]])
                if not delivered and skipped:  # a stream that only skips would spin forever, saying nothing
                    raise RuntimeError(f"rank {s.rank}, reader {worker}: every sample of epoch {epoch}'s "
                                       f"{len(shards) - first} shards was skipped ({dict(skipped)}); first: "
                                       f"{shards[first]}")  # fmt: skip
                epoch += 1
            if batch or skips or finished:  # a finite stream (max_epochs) delivers everything: a short last batch
                yield s.collate(batch) if batch else None, worker, Position(epoch, 0, 0), _take(skips, finished)
        finally:
            fetcher.close()

    def _shard(
        self,
        fetcher: ShardFetcher,
        url: str,
        epoch: int,
        index: int,
        done: int,
        skips: defaultdict[str, Counter],
        keep: tuple[int, int],
    ) -> Iterator[tuple[int, Any]]:
        """(samples of the shard delivered so far, item) in delivery order: the shard's samples in chunks of
        `shuffle_buffer`, each chunk permuted by a generator seeded from its place, so a resume after `done`
        delivers exactly the rest. keep = (parts, slot): only the samples whose index in the shard is slot modulo
        parts (a set with fewer shards than readers). Skips go to `skips` when met, only those after `done`: a
        failed item at its place in delivery order; at the shard's end, the samples its manifest record counts
        that the tar did not hold (corrupt or cut tar data); a shard failing its sha256, what was left of it."""
        s, size = self.s, max(1, self.s.shuffle_buffer)
        known = self._known(url)  # 0: nothing gives the shard's count
        damage = TarDamage()  # corrupt tar data: what can still be read goes on

        try:
            stream = samples([url], s.settings, handler=damage, opener=fetcher.open)
            chunk = list(itertools.islice(stream, size))  # the shard is opened (and checked) here
        except ShardChecksumError as e:
            lost = self._kept_after(known, done, keep, epoch, index) if known else int(keep[1] == 0)
            skips[url]["sha256 mismatch"] += lost
            log.error(f"{e}: its {lost} remaining samples for this reader are skipped")
            return
        read = 0  # samples the tar held
        while chunk:
            base, read = read, read + len(chunk)
            if read > done:
                for k, j in enumerate(self._order(epoch, index, base // size + 1, len(chunk))):
                    n = base + k + 1
                    if n <= done or (base + j) % keep[0] != keep[1]:
                        continue
                    sample = chunk[j]
                    sample["__epoch__"] = epoch
                    try:
                        item = s.make_item(sample)
                    except Exception as e:
                        skips[url][str(e) if isinstance(e, SkipSampleError) else type(e).__name__] += 1
                        continue
                    yield n, item
            chunk = list(itertools.islice(stream, size))
        if known > read:  # the samples the tar lost, each counted by the slot that would have read it
            skips[url][damage.reason] += sum(1 for i in range(read, known) if i % keep[0] == keep[1])
        elif keep[1] == 0 and damage.losses(known, read):  # no count to say how many were lost: the failure, once
            skips[url][damage.reason] += 1

    def _known(self, url: str) -> int:
        """The shard's sample count: its manifest record's, else img2dataset's `_stats.json` beside it, else 0 (said
        once per reader: the samples a cut or corrupt tar loses cannot be counted then)."""
        record = self.s.records.get(url, {})
        if "samples" in record:
            return int(record["samples"])
        count = expected_samples(url, self.s.settings)
        if count is None and not self.uncounted:
            self.uncounted = True
            log.warning(f"shard {url} has no count (no manifest record, no _stats.json beside it): the samples a cut "
                        f"or corrupt tar loses cannot be counted, for it and any other such shard (said once; "
                        f"tools/index_shards.py writes a manifest with counts)")  # fmt: skip
        return count or 0

    def _order(self, epoch: int, index: int, chunk: int, length: int) -> list[int]:
        """The delivery order of chunk `chunk` (from 1) of shard `index` of this rank's list for `epoch`."""
        order = list(range(length))
        random.Random(f"{self.s.seed}/{self.s.rank}/{epoch}/{index}/{chunk}").shuffle(order)
        return order

    def _kept_after(self, known: int, done: int, keep: tuple[int, int], epoch: int, index: int) -> int:
        """How many samples of a shard of `known` this slot delivers after position `done`."""
        size, count = max(1, self.s.shuffle_buffer), 0
        for base in range(0, known, size):
            length = min(size, known - base)
            if base + length > done:
                order = self._order(epoch, index, base // size + 1, length)
                count += sum(base + k + 1 > done and (base + j) % keep[0] == keep[1] for k, j in enumerate(order))
        return count


def _take(skips: defaultdict[str, Counter], finished: list[str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """(the skips met so far as plain dicts, the shards finished), and both emptied."""
    out = {url: dict(reasons) for url, reasons in skips.items() if reasons}, list(finished)
    skips.clear()
    finished.clear()
    return out


class Stream:
    """Batches of `make_item(sample)` for one rank, through a DataLoader with `workers` worker processes (0: in
    this process); `state()` / `load_state()` save and restore every worker's position and the skip counts.
    `records`: url -> the shard's manifest record ("sha256", "samples"), for checks on read (settings.verify)."""

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
        skips: SkipCounter | None = None,
        records: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("no shards to stream")
        self.urls, self.make_item, self.batch_size, self.collate = urls, make_item, batch_size, collate
        self.rank, self.world, self.seed, self.workers = rank, world, seed, workers
        self.shuffle_buffer, self.max_epochs, self.prefetch = shuffle_buffer, max_epochs, prefetch
        self.settings = settings or S3Settings()
        self.records = records or {}
        self.positions: dict[int, Position] = {}
        self.delivered = 0  # batches handed out (which worker's turn it is)
        self.skips = skips if skips is not None else SkipCounter()
        readers = world * max(1, workers)
        if len(urls) < readers and rank == 0 and any(u.startswith("s3://") for u in urls):
            log.warning(f"{len(urls)} train shards for {readers} readers ({world} ranks x {max(1, workers)} "
                        f"workers): every reader downloads every shard and keeps 1/{readers} of its samples; "
                        f"write at least {readers} shards")  # fmt: skip

    def state(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "workers": self.workers, "seed": self.seed,
                "positions": {w: asdict(p) for w, p in self.positions.items()}, "skips": self.skips.shards,
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
        self.skips.shards = {}
        self.skips.add({url: r if isinstance(r, dict) else {"skipped": int(r)} for url, r in state["skips"].items()})
        self.delivered = int(state.get("delivered", 0))

    def __iter__(self) -> Iterator[Any]:
        kwargs = {"prefetch_factor": self.prefetch, "persistent_workers": False} if self.workers else {}
        # its own generator: a DataLoader draws its workers' base seed from the global one otherwise, and a resumed
        # run (which restores the global generator, engine/rng.py) would then draw different training noise
        generator = torch.Generator().manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(_Worker(self), batch_size=None, num_workers=self.workers,
                                             generator=generator, **kwargs)  # fmt: skip
        unlogged = SkipCounter()  # skips of shards being read: one line when a reader finishes the shard
        for batch, worker, position, (skips, finished) in loader:
            self.positions[worker] = position
            self.skips.add(skips)
            unlogged.add(skips)
            for url in finished:
                reasons = unlogged.shards.pop(url, None)
                if reasons:
                    said = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
                    log.warning(f"rank {self.rank}: shard {url}: skipped {sum(reasons.values())} samples ({said}); "
                                f"{sum(self.skips.shards[url].values())} from this shard in all")  # fmt: skip
            if batch is None:  # the end of a finite stream, carrying only skips
                continue
            self.delivered += 1
            yield batch
