"""megadalle/data/s3.py against a real S3 server (SeaweedFS, tests/s3server.py) holding the emoji shards: the
shard URL forms, every sample read exactly once per epoch by 2 ranks x 2 DataLoader workers (processes), a read
that survives the server being killed and restarted, and clear errors that never show the secret."""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from megadalle.data import s3 as s3mod
from megadalle.data.s3 import S3Error, S3Settings, epoch_shards, list_shards, open_shard, samples
from tests.s3server import BUCKET, SECRET_KEY

pytestmark = pytest.mark.distributed  # a server process, and DataLoader worker processes


@pytest.fixture
def server(s3_server):
    return s3_server


def _keys(urls: list[str]) -> list[str]:
    return [s["__key__"] for s in samples(urls)]


def test_shard_url_forms(server) -> None:
    names = [Path(p).name for p in server.local]
    listed = list_shards(f"s3://{BUCKET}/emoji/train/")
    assert listed == [f"s3://{BUCKET}/emoji/train/{n}" for n in sorted(names)]
    first, last = sorted(names)[0], sorted(names)[-1]
    stem = first.rsplit("-", 1)[0]
    braces = f"s3://{BUCKET}/emoji/train/{stem}-{{{first.rsplit('-', 1)[1][:-4]}..{last.rsplit('-', 1)[1][:-4]}}}.tar"
    assert list_shards(braces) == listed
    local_dir = str(Path(server.local[0]).parent) + "/"
    assert list_shards(local_dir) == sorted(server.local) == list_shards("file://" + local_dir)
    with pytest.raises(S3Error, match=f"no .tar objects under s3://{BUCKET}/nothing/"):
        list_shards(f"s3://{BUCKET}/nothing/")


def test_s3_bytes_equal_the_local_shard(server) -> None:
    url = f"s3://{BUCKET}/emoji/train/{Path(server.local[0]).name}"
    with open_shard(url) as f:
        assert f.read() == Path(server.local[0]).read_bytes()
    assert _keys([url]) == _keys([server.local[0]])


class _Epoch(torch.utils.data.IterableDataset):
    def __init__(self, urls: list[str], epoch: int, rank: int, world: int) -> None:
        self.urls, self.epoch, self.rank, self.world = urls, epoch, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for s in samples(epoch_shards(self.urls, self.epoch, 7, self.rank, self.world, worker, workers)):
            yield s["__key__"]


def test_two_ranks_by_two_workers_read_every_sample_once_per_epoch(server) -> None:
    urls = list_shards(f"s3://{BUCKET}/emoji/train/")
    want = collections.Counter(_keys(server.local))
    assert want and max(want.values()) == 1
    for epoch in (0, 1):
        got: collections.Counter = collections.Counter()
        per_rank = []
        for rank in range(2):
            loader = torch.utils.data.DataLoader(_Epoch(urls, epoch, rank, 2), batch_size=None, num_workers=2)
            keys = list(loader)
            per_rank.append(set(keys))
            got.update(keys)
        assert got == want, epoch  # every sample, exactly once
        assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    shards = [epoch_shards(urls, 0, 7, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(sum(shards, [])) == sorted(urls)
    assert len({tuple(epoch_shards(urls, e, 7, 0, 1)) for e in range(6)}) > 1  # reshuffled per epoch


def test_a_read_survives_the_server_killed_and_restarted(server) -> None:
    """48 MB, more than the sockets buffer: the server dies a third of the way in and comes back 1.5 s later."""
    expected = os.urandom(48 << 20)
    server.client().put_object(Bucket=BUCKET, Key="big/blob.bin", Body=expected)
    url = f"s3://{BUCKET}/big/blob.bin"
    settings = S3Settings(max_retry_s=60, backoff_s=0.2)
    stream = s3mod._S3Stream(url, settings)
    first = stream.read(len(expected) // 3)
    server.kill()  # mid-object
    restarter = threading.Timer(1.5, server.start)
    restarter.start()
    rest = bytearray()
    while chunk := stream.read(1 << 16):
        rest += chunk
    restarter.join()
    assert first + bytes(rest) == expected
    assert stream.retries >= 1  # it did retry, and resumed at its offset (no duplicate bytes)
    stream.close()


def test_giving_up_names_the_object(server, tmp_path) -> None:
    dead = S3Settings(endpoint_url="http://127.0.0.1:9", max_retry_s=1.0, backoff_s=0.1)
    started = time.monotonic()
    with pytest.raises(S3Error, match=r"cannot read endpoint http://127.0.0.1:9, bucket 'shards', key 'x.tar'"):
        open_shard(f"s3://{BUCKET}/x.tar", dead)
    assert time.monotonic() - started < 10
    with pytest.raises(S3Error, match=r"no such object \(NoSuchKey\)"):
        open_shard(f"s3://{BUCKET}/emoji/missing.tar")


def test_wrong_credentials_name_endpoint_and_bucket_not_the_secret(server, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET_KEY)
    s3mod._client.cache_clear()
    try:
        with pytest.raises(S3Error) as err:
            open_shard(f"s3://{BUCKET}/emoji/train/{Path(server.local[0]).name}")
    finally:
        monkeypatch.undo()
        s3mod._client.cache_clear()
    msg = str(err.value)
    assert "credentials rejected" in msg and server.endpoint in msg and f"bucket {BUCKET!r}" in msg
    out = capsys.readouterr()
    assert SECRET_KEY not in msg + out.out + out.err


def test_upload_tool_multipart_manifest_last_and_verify(server, emoji_shards, capsys) -> None:
    from upload_shards import main as upload

    from megadalle.data.s3 import read_remote_manifest, verify_remote
    from megadalle.data.shards import read_manifest

    url = f"s3://{BUCKET}/uploaded/"
    assert upload([str(emoji_shards), url, "--part-mb", "5", "--verify"]) == 0  # 5 MB: S3's smallest part
    out = capsys.readouterr().out
    local = read_manifest(emoji_shards)
    n = sum(s["samples"] for sp in local["splits"].values() for s in sp["shards"])
    assert f"verified {n} samples" in out
    assert read_remote_manifest(url) == local
    # a tampered shard is caught on verification
    first = local["splits"]["train"]["shards"][0]["path"]
    server.client().put_object(Bucket=BUCKET, Key=f"uploaded/{first}", Body=b"not a tar")
    with pytest.raises(S3Error, match=f"key 'uploaded/{first}'.*sha256"):
        verify_remote(url)


def test_multipart_upload_above_the_threshold(server, tmp_path) -> None:
    """An object above the part size goes up in parts (its ETag ends in -<parts>) and reads back intact."""
    from boto3.s3.transfer import TransferConfig

    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(11 << 20))
    c = s3mod.client(S3Settings())
    c.upload_file(str(blob), BUCKET, "mp/blob.bin", Config=TransferConfig(multipart_threshold=5 << 20,
                                                                           multipart_chunksize=5 << 20))  # fmt: skip
    assert c.head_object(Bucket=BUCKET, Key="mp/blob.bin")["ETag"].strip('"').endswith("-3")
    with open_shard(f"s3://{BUCKET}/mp/blob.bin") as f:
        assert f.read() == blob.read_bytes()


def test_the_fetcher_reads_ahead_and_checks_sha256(server) -> None:
    from megadalle.data.s3 import ShardChecksumError, ShardFetcher
    from megadalle.data.shards import sha256_file

    urls = [f"s3://{BUCKET}/emoji/train/{Path(p).name}" for p in server.local[:2]]
    sums = {u: sha256_file(p) for u, p in zip(urls, server.local)}
    fetcher = ShardFetcher(S3Settings(read_ahead=1, verify=True), sums)
    try:
        fetcher.ahead(urls[1:])  # the next shard starts downloading in the background
        assert list(fetcher.pending) == urls[1:]
        for url, path in zip(urls, server.local):
            with fetcher.open(url) as f:
                assert f.read() == Path(path).read_bytes()
        assert not fetcher.pending
        wrong = ShardFetcher(S3Settings(read_ahead=0, verify=True), {urls[0]: "0" * 64})
        with pytest.raises(ShardChecksumError, match=f"{urls[0]}: sha256 .* differs from the manifest's 000000000000"):
            wrong.open(urls[0])
    finally:
        fetcher.close()


def test_evaluation_and_tokenizer_inputs_read_from_s3_equal_the_local_set(server, emoji_shards) -> None:
    from megadalle.data.loader import captions, eval_images
    from megadalle.data.s3 import upload_shard_set

    upload_shard_set(emoji_shards, f"s3://{BUCKET}/whole/")
    remote = f"s3://{BUCKET}/whole/"
    for (a, ca, ma), (b, cb, mb) in zip(eval_images(str(emoji_shards), "val", 16, 32),
                                        eval_images(remote, "val", 16, 32), strict=True):  # fmt: skip
        assert torch.equal(a, b) and ca == cb and ma == mb
    assert captions(remote) == captions(str(emoji_shards))
