"""megadalle/data/stream.py: every sample once per epoch over 2 ranks x 2 DataLoader worker processes (local
shards and the real S3 server), a stop and resume that delivers exactly the rest of the epoch in the same order,
and a shard with a truncated member and an undecodable image read to its end with the skips counted."""

from __future__ import annotations

import collections
import io
import itertools
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from megadalle.data.s3 import list_shards
from megadalle.data.shards import split_urls
from megadalle.data.stream import Stream
from tests.s3server import BUCKET

pytestmark = pytest.mark.distributed  # DataLoader worker processes


def _key(sample: dict) -> str:
    """The item: the sample's key, after decoding its image (an undecodable one raises)."""
    with Image.open(io.BytesIO(sample["png"])) as im:
        im.load()
    return sample["__key__"]


def _all_keys(urls: list[str]) -> collections.Counter:
    return collections.Counter(itertools.chain.from_iterable(Stream(urls, _key, 1000, max_epochs=1)))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_ranks_by_two_workers_deliver_each_sample_once_per_epoch(where, emoji_shards, request) -> None:
    urls = split_urls(emoji_shards, "train")
    want = _all_keys(urls)
    if where == "s3":
        request.getfixturevalue("s3_server")
        urls = list_shards(f"s3://{BUCKET}/emoji/train/")
    got: collections.Counter = collections.Counter()
    for rank in range(2):
        stream = Stream(urls, _key, 8, rank=rank, world=2, seed=3, workers=2, shuffle_buffer=16, max_epochs=2)
        got.update(itertools.chain.from_iterable(stream))
    assert set(got) == set(want) and set(got.values()) == {2}  # two epochs: each sample exactly twice


def test_stop_and_resume_delivers_exactly_the_rest_of_the_epoch(emoji_shards) -> None:
    urls = split_urls(emoji_shards, "train")
    epoch = set(_all_keys(urls))
    kw = dict(rank=0, world=1, seed=5, workers=2, shuffle_buffer=16, max_epochs=1)
    first = Stream(urls, _key, 8, **kw)
    it = iter(first)
    before = list(itertools.chain.from_iterable(next(it) for _ in range(7)))
    state = first.state()
    del it
    second = Stream(urls, _key, 8, **kw)
    second.load_state(state)
    after = list(itertools.chain.from_iterable(second))
    seen = collections.Counter(before + after)
    assert max(seen.values()) == 1 and set(seen) == epoch  # nothing repeated, nothing skipped: the window is 0
    uninterrupted = list(itertools.chain.from_iterable(Stream(urls, _key, 8, **kw)))
    assert before + after == uninterrupted  # the same order, across the 2 workers' turns (7 batches: an odd count)
    with pytest.raises(ValueError, match="saved for rank 0 of 1 with 2 workers and seed 5; this run is rank 0 of 1"
                                         " with 1 workers"):  # fmt: skip
        Stream(urls, _key, 8, rank=0, world=1, seed=5, workers=1).load_state(state)


def test_a_truncated_member_and_a_bad_image_are_skipped_and_counted(emoji_shards, tmp_path) -> None:
    good = Path(split_urls(emoji_shards, "train")[0])
    with tarfile.open(good) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for m, data in members:
            if m.name == f"{keys[1]}.png":
                data = b"\x89PNG not really an image"  # decodes to an error
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    raw = bad.read_bytes()
    cut = raw.index(f"{keys[-1]}.png".encode()) + 1024  # inside the last sample's image: a truncated member
    (tmp_path / "truncated.tar").write_bytes(raw[:cut])
    stream = Stream([str(tmp_path / "truncated.tar")], _key, 4, max_epochs=1)
    got = set(itertools.chain.from_iterable(stream))
    assert keys[1] not in got and keys[-1] not in got  # the bad image, the cut sample
    assert got == set(keys) - {keys[1], keys[-1]}  # everything else of the shard
    # counted against the shard: the bad image, and the truncation (the tar error and the incomplete sample)
    assert (
        list(stream.skips) == [str(tmp_path / "truncated.tar")] and stream.skips[str(tmp_path / "truncated.tar")] >= 2
    )


def test_fewer_shards_than_readers_split_by_sample(emoji_shards) -> None:
    """One shard, 2 ranks x 2 workers: each reader keeps its own residue of the sample index; once per epoch."""
    urls = split_urls(emoji_shards, "train")[:1]
    want = _all_keys(urls)
    got: collections.Counter = collections.Counter()
    for rank in range(2):
        got.update(itertools.chain.from_iterable(Stream(urls, _key, 4, rank=rank, world=2, workers=2, max_epochs=1)))
    assert got == want


def test_an_s3_outage_longer_than_the_retries_is_an_error_not_a_skip(s3_server) -> None:
    from megadalle.data.s3 import S3Error, S3Settings

    urls = list_shards(f"s3://{BUCKET}/emoji/train/")
    s3_server.kill()
    try:
        stream = Stream(urls, _key, 4, settings=S3Settings(max_retry_s=1.0, backoff_s=0.1), max_epochs=1)
        with pytest.raises(S3Error, match="cannot read endpoint .* after 1 s of retries"):
            next(iter(stream))
        assert stream.skips == {}
    finally:
        s3_server.start()
