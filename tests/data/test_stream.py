"""megadalle/data/stream.py: every sample once per epoch over 2 ranks x 2 DataLoader worker processes (local
shards and the real S3 server), a stop and resume that delivers exactly the rest of the epoch in the same order,
and a shard with a truncated member and an undecodable image read to its end with the skips counted."""

from __future__ import annotations

import collections
import io
import itertools
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from megadalle.config import Data
from megadalle.data.loader import SkipCounter, train_images
from megadalle.data.s3 import epoch_shards, list_shards
from megadalle.data.shards import split_urls
from megadalle.data.stream import Stream
from tests.conftest import FLAWS
from tests.s3server import BUCKET

pytestmark = pytest.mark.distributed  # DataLoader worker processes


def _key(sample: dict) -> str:
    """The item: the sample's key, after decoding its image (an undecodable one raises)."""
    with Image.open(io.BytesIO(sample["png"])) as im:
        im.load()
    return sample["__key__"]


def _all_keys(urls: list[str]) -> collections.Counter:
    return collections.Counter(itertools.chain.from_iterable(Stream(urls, _key, 1000, max_epochs=1)))


@pytest.mark.parametrize("where", ["local", "s3", "s3_read_ahead"])
def test_two_ranks_by_two_workers_deliver_each_sample_once_per_epoch(where, emoji_shards, request) -> None:
    """Also with each next shard fetched whole in the background (data.read_ahead = 1)."""
    from megadalle.data.s3 import S3Settings

    urls = split_urls(emoji_shards, "train")
    want = _all_keys(urls)
    if where != "local":
        request.getfixturevalue("s3_server")
        urls = list_shards(f"s3://{BUCKET}/emoji/train/")
    settings = S3Settings(read_ahead=int(where == "s3_read_ahead"))
    got: collections.Counter = collections.Counter()
    for rank in range(2):
        stream = Stream(urls, _key, 8, rank=rank, world=2, seed=3, workers=2, shuffle_buffer=16, max_epochs=2,
                        settings=settings)  # fmt: skip
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


def test_a_truncated_member_and_a_bad_image_are_skipped_and_counted(emoji_shards, tmp_path, caplog) -> None:
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
    shard = str(tmp_path / "truncated.tar")
    stream = Stream([shard], _key, 4, max_epochs=1)
    with caplog.at_level(logging.WARNING, logger="megadalle.data.stream"):
        got = set(itertools.chain.from_iterable(stream))
    assert keys[1] not in got and keys[-1] not in got  # the bad image, the cut sample
    assert got == set(keys) - {keys[1], keys[-1]}  # everything else of the shard
    # counted against the shard by reason: the bad image, the cut sample (no png: KeyError), the tar error once
    assert stream.skips.shards == {shard: {"UnidentifiedImageError": 1, "KeyError": 1, "corrupt tar (ReadError)": 1}}
    logged = [r.getMessage() for r in caplog.records if shard in r.getMessage()]
    assert logged and "UnidentifiedImageError" in " ".join(logged)


def _flawed_stream(root: Path | str, workers: int = 0, **data) -> Stream:
    """The loader's real training stream (decode, caption checks, Listing 1) over one epoch of `root`."""
    data = {"shuffle_buffer": 16, **data}
    stream = train_images(Data(shards=str(root), num_workers=workers, **data), 32, 4, 0, 1, SkipCounter(), world=1)
    stream.max_epochs = 1
    return stream


def test_unusable_samples_are_skipped_counted_by_reason_and_logged_per_shard(flawed_shards, caplog) -> None:
    stream = _flawed_stream(flawed_shards)
    with caplog.at_level(logging.WARNING, logger="megadalle.data.stream"):
        images, captions = zip(*(b for b in stream))
    assert sum(len(c) for c in captions) == 96 - sum(FLAWS.values())  # every usable sample, once
    assert all(c.strip() and len(c) <= 1024 for batch in captions for c in batch)
    assert stream.skips.by_reason() == FLAWS and len(stream.skips.shards) == 3  # each shard has some
    for url, reasons in stream.skips.shards.items():  # one line per shard, when it has been read
        lines = [r.getMessage() for r in caplog.records if url in r.getMessage()]
        assert len(lines) == 1 and f"skipped {sum(reasons.values())} samples" in lines[0], lines


def test_a_resume_counts_no_skip_twice(flawed_shards) -> None:
    """Stopped after 3 batches (2 workers) and resumed: the skip counts equal the uninterrupted epoch's."""
    whole = _flawed_stream(flawed_shards, workers=2)
    uninterrupted = [c for _, captions in whole for c in captions]
    first = _flawed_stream(flawed_shards, workers=2)
    it = iter(first)
    before = [c for _ in range(3) for c in next(it)[1]]
    state = first.state()
    del it
    second = _flawed_stream(flawed_shards, workers=2)
    second.load_state(state)
    after = [c for _, captions in second for c in captions]
    assert before + after == uninterrupted
    assert second.skips.shards == whole.skips.shards and second.skips.by_reason() == FLAWS


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
        assert stream.skips.total == 0
    finally:
        s3_server.start()


def test_a_shard_failing_its_sha256_is_skipped_and_counted(flawed_shards, s3_server, caplog) -> None:
    """The flawed set uploaded; one shard then replaced on the server: with data.verify_sha256 its 32 samples are
    skipped (fetched twice, then logged), the other two are read."""
    from megadalle.data.s3 import upload_shard_set

    manifest = upload_shard_set(flawed_shards, f"s3://{BUCKET}/flawed/")
    tampered = manifest["splits"]["train"]["shards"][1]["path"]
    s3_server.client().upload_file(split_urls(flawed_shards, "val")[0], BUCKET, f"flawed/{tampered}")
    stream = _flawed_stream(f"s3://{BUCKET}/flawed/", verify_sha256=True)
    with caplog.at_level(logging.WARNING, logger="megadalle.data.stream"):
        n = sum(len(captions) for _, captions in stream)
    url = f"s3://{BUCKET}/flawed/{tampered}"
    assert stream.skips.shards[url] == {"sha256 mismatch": 32}
    assert n + stream.skips.total == 96  # every sample read or counted
    assert any(r.levelname == "ERROR" and url in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)


def test_fewer_s3_shards_than_readers_warn_that_every_reader_downloads_all(s3_server, caplog) -> None:
    urls = list_shards(f"s3://{BUCKET}/emoji/train/")[:1]
    with caplog.at_level(logging.WARNING, logger="megadalle.data.stream"):
        Stream(urls, _key, 4, rank=0, world=2, workers=2)
    assert "1 train shards for 4 readers (2 ranks x 2 workers): every reader downloads every shard" in caplog.text


def test_samples_lost_to_a_tar_cut_at_a_header_are_counted_from_the_manifest(flawed_shards, tmp_path) -> None:
    """A tar cut at a 512-byte header boundary ends without an error: the manifest's count shows what is missing."""
    from megadalle.data.shards import read_manifest

    path = Path(split_urls(flawed_shards, "train")[0])
    raw = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    cut = members[3 * 24].offset  # the header of sample 24's first member: samples 24..31 are gone
    (tmp_path / "cut.tar").write_bytes(raw[:cut])
    url = str(tmp_path / "cut.tar")
    record = read_manifest(flawed_shards)["splits"]["train"]["shards"][0]
    stream = Stream([url], _key, 4, max_epochs=1, records={url: record})
    got = list(itertools.chain.from_iterable(stream))
    assert stream.skips.shards[url]["tar ended early"] == 8 and len(got) + stream.skips.total == 32


def test_a_shard_failing_its_sha256_after_a_resume_counts_what_was_left(flawed_shards, tmp_path) -> None:
    root = tmp_path / "set"
    shutil.copytree(flawed_shards, root)
    kw = dict(workers=0, shuffle_buffer=8)
    first = _flawed_stream(root, **kw)
    it = iter(first)
    before = sum(len(next(it)[1]) for _ in range(2))
    state = first.state()
    del it
    current = epoch_shards(first.urls, 0, 1, 0, 1)[first.positions[0].shard]
    with open(current, "ab") as f:  # still a readable tar, no longer the bytes the manifest vouches for
        f.write(b"\0" * 1024)
    second = _flawed_stream(root, verify_sha256=True, **kw)
    second.load_state(state)
    after = sum(len(captions) for _, captions in second)
    assert second.skips.shards[current]["sha256 mismatch"] > 0
    assert before + after + second.skips.total == 96  # every sample delivered or counted once, across the resume


def test_a_reader_whose_every_sample_fails_is_an_error(emoji_shards) -> None:
    def broken(sample: dict) -> str:
        raise KeyError("jpg")

    with pytest.raises(RuntimeError, match="every sample of epoch 0's .* shards was skipped .*KeyError"):
        next(iter(Stream(split_urls(emoji_shards, "train"), broken, 4)))
