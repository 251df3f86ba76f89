"""Shards on S3 (and local disk): naming, listing, opening with retries, and the split by rank and worker.

A shard set is named by a URL: `s3://bucket/prefix/shard-{000000..000099}.tar` (brace-expanded),
`s3://bucket/prefix/` (every `.tar` under the prefix, sorted), `file:///path/...` or a plain path, with the same
two forms. S3 is reached with boto3's standard credential chain (environment, shared files, instance roles);
the endpoint comes from `endpoint_url` (the config) or `AWS_ENDPOINT_URL`.

`open_shard` streams an object and survives a server that drops the connection or goes away for a while: a read
that fails re-opens the object at the byte it stopped at (a Range GET) with exponential backoff, until
`max_retry_s` of failed attempts; then it raises `S3Error` naming the endpoint, bucket and key. Credentials that
the server rejects raise at once, naming the endpoint and bucket but never the secret.

`ShardFetcher` fetches whole shards `read_ahead` ahead of the reader in a background thread (network time overlaps
decoding), into spooled temporary files, and checks each against its manifest sha256 when given one: a shard that
fails the check twice raises `ShardChecksumError` (the stream skips and counts its samples).

`epoch_shards` gives each (rank, worker) its disjoint share of one epoch's shuffled shard list.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from braceexpand import braceexpand

AUTH_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


class S3Error(RuntimeError):
    """A shard that cannot be listed or read, named by endpoint, bucket and key (never by credentials)."""


class S3NotFoundError(S3Error):
    """The object (or its bucket) does not exist: not retried."""


class ShardChecksumError(ValueError):
    """A shard whose bytes do not match its manifest sha256 (after one re-fetch)."""


class TarDamage:
    """A webdataset handler that reads past corrupt or cut tar data, noting the failures; an S3Error (the object
    could not be read after the retries) is raised, not read past. `losses(expected, read)`: the samples a shard
    lost by reason, where a count (a manifest record, an img2dataset `_stats.json`; 0: none) says how many it had:
    the missing ones, or without a count one for a broken tar."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, S3Error):
            raise exn
        self.seen.append(type(exn).__name__)
        return True

    @property
    def reason(self) -> str:
        return f"corrupt tar ({self.seen[0]})" if self.seen else "tar ended early"

    def losses(self, expected: int, read: int) -> int:
        if expected > read:
            return expected - read
        return 1 if self.seen and not expected else 0


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    """S3 endpoint (None: AWS_ENDPOINT_URL, else AWS's own)."""
    region: str = "us-east-1"
    max_retry_s: float = 60.0
    """Seconds of failed attempts after which a read gives up."""
    backoff_s: float = 0.2
    """First pause between attempts, doubled each time up to 5 s."""
    read_ahead: int = 0
    """s3:// shards fetched whole this many ahead of the one being read, in a background thread (0: stream each
    shard as it is read)."""
    verify: bool = False
    """Check each shard's sha256 against the manifest before reading it (the shard is fetched whole first)."""

    @property
    def endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str, pid: int) -> Any:
    """One boto3 client per process (`pid`: a DataLoader worker forked from a parent builds its own)."""
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def client(settings: S3Settings) -> Any:
    return _client(settings.endpoint, settings.region, os.getpid())


def _split_s3(url: str) -> tuple[str, str]:
    u = urlparse(url)
    return u.netloc, u.path.lstrip("/")


def _where(settings: S3Settings, bucket: str, key: str = "") -> str:
    return f"endpoint {settings.endpoint or 'AWS default'}, bucket {bucket!r}" + (f", key {key!r}" if key else "")


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def list_shards(url: str, settings: S3Settings = S3Settings()) -> list[str]:
    """The shard URLs (or paths) a shard-set URL names, in order: every `.tar` directly under `s3://bucket/prefix/`
    (the slash may be left out) or in a local folder (sorted), a brace pattern (`{00000..00331}.tar`), one `.tar`,
    or a `.txt` file (local or s3://) listing shard URLs one a line (blank and `#` lines ignored; a relative path is
    relative to the list's folder)."""
    if url.endswith(".txt"):
        return _url_list(url, settings)
    if url.startswith("s3://"):
        if not url.endswith((".tar", "/")) and not ("{" in url and ".." in url):
            url += "/"  # s3://bucket/prefix: the prefix's folder, as a local path names its folder
        if url.endswith("/"):
            bucket, prefix = _split_s3(url)
            keys: list[str] = []
            pages = client(settings).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                                Delimiter="/")  # fmt: skip
            try:  # this level only, as a local folder's glob: not val/ or tokens/ beneath it
                for page in pages:
                    keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
            except Exception as e:
                why = _code(e) or type(e).__name__
                raise S3Error(f"cannot list {url} ({_where(settings, bucket)}): {why}") from None
            if not keys:
                raise S3Error(f"no .tar objects under {url} ({_where(settings, bucket)})")
            return [f"s3://{bucket}/{k}" for k in sorted(keys)]
        return list(braceexpand(url))
    path = url[len("file://") :] if url.startswith("file://") else url
    if path.endswith("/") or Path(path).is_dir():
        found = sorted(str(p) for p in Path(path).glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"no .tar shards in {path}")
        return found
    paths = list(braceexpand(path))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} shards {url} names do not exist: {missing[0]}, ..."
        )
    return paths


def _url_list(url: str, settings: S3Settings) -> list[str]:
    raw = read_object(url, settings)
    if raw is None:
        raise FileNotFoundError(f"shard list {url} does not exist")
    base = url.rsplit("/", 1)[0] + "/" if "/" in url else ""
    urls = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.endswith(".tar"):
            raise ValueError(f"{url}, line {n}: {line!r} is not a .tar shard")
        urls.append(line if "://" in line or line.startswith("/") else base + line)
    if not urls:
        raise ValueError(f"shard list {url} names no shards")
    return urls


def object_size(url: str, settings: S3Settings = S3Settings()) -> int | None:
    """The size in bytes of an object or file (one HEAD request), or None when it does not exist."""
    if not url.startswith("s3://"):
        path = Path(url[len("file://") :] if url.startswith("file://") else url)
        return path.stat().st_size if path.is_file() else None
    bucket, key = _split_s3(url)
    try:
        return int(client(settings).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as e:
        if _code(e) in ("NoSuchKey", "NoSuchBucket", "404"):
            return None
        raise S3Error(
            f"cannot look up {url} ({_where(settings, bucket, key)}): {_code(e) or type(e).__name__}"
        ) from None


def put_object(url: str, body: bytes | Path, settings: S3Settings = S3Settings()) -> None:
    """Write `body` (bytes, or a local file's contents, uploaded in parts when large) as the object `url`: an S3
    object appears whole or not at all."""
    bucket, key = _split_s3(url)
    try:
        if isinstance(body, Path):
            client(settings).upload_file(str(body), bucket, key)
        else:
            client(settings).put_object(Bucket=bucket, Key=key, Body=body)
    except Exception as e:
        raise S3Error(f"cannot write {url} ({_where(settings, bucket, key)}): {_code(e) or type(e).__name__}") from None


def read_object(url: str, settings: S3Settings = S3Settings()) -> bytes | None:
    """The whole of a small object or file (a manifest, a list, an img2dataset `_stats.json`); None when it does
    not exist. Other failures raise (S3Error after the retries)."""
    if url.startswith("s3://"):
        try:
            with open_shard(url, settings) as f:
                return f.read()
        except S3NotFoundError:
            return None
    path = url[len("file://") :] if url.startswith("file://") else url
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


class _S3Stream(io.RawIOBase):
    """A readable object body that re-opens at its current offset when a read fails. One deadline covers a run of
    failures (`max_retry_s`, pauses doubling from `backoff_s` with jitter); a re-open must answer with the range
    asked for, of the same object (its ETag), or the read fails instead of stitching other bytes in."""

    def __init__(self, url: str, settings: S3Settings) -> None:
        self.url, self.settings = url, settings
        self.bucket, self.key = _split_s3(url)
        self.pos, self.body, self.etag, self.size = 0, None, None, None
        self.retries = 0
        self._open(time.monotonic())

    def readable(self) -> bool:
        return True

    def _open(self, started: float) -> None:
        pause = self.settings.backoff_s
        while True:
            try:
                extra: dict[str, str] = {}
                if self.pos:
                    extra = {"Range": f"bytes={self.pos}-", **({"IfMatch": self.etag} if self.etag else {})}
                reply = client(self.settings).get_object(Bucket=self.bucket, Key=self.key, **extra)
                if self.pos and not str(reply.get("ContentRange", "")).startswith(f"bytes {self.pos}-"):
                    reply["Body"].close()
                    raise S3Error(f"{_where(self.settings, self.bucket, self.key)} answered a read from byte "
                                  f"{self.pos} with {reply.get('ContentRange') or 'the whole object'}")  # fmt: skip
                if self.body is not None:
                    self.body.close()
                self.body = reply["Body"]
                self.etag = self.etag or reply.get("ETag")
                self.size = self.size if self.size is not None else reply.get("ContentLength")
                return
            except S3Error:
                raise
            except Exception as e:
                if _code(e) in ("InvalidRange", "416") and self.size is not None and self.pos >= self.size:
                    self.body = io.BytesIO(b"")  # the object was read to its end
                    return
                self._give_up_or_wait(e, started, pause)
                pause = min(2 * pause, 5.0)

    def _give_up_or_wait(self, e: Exception, started: float, pause: float) -> None:
        code = _code(e)
        where = _where(self.settings, self.bucket, self.key)
        if code in AUTH_ERRORS or type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise S3Error(f"credentials rejected or missing ({code or type(e).__name__}) by {where}") from None
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise S3NotFoundError(f"no such object ({code}): {where}") from None
        if code in ("PreconditionFailed", "412"):
            raise S3Error(f"{where} changed while it was being read") from None
        if time.monotonic() - started + pause > self.settings.max_retry_s:
            raise S3Error(f"cannot read {where} at byte {self.pos} after {self.settings.max_retry_s:.0f} s of "
                          f"retries: {code or type(e).__name__}") from None  # fmt: skip
        self.retries += 1
        time.sleep(pause * random.uniform(0.5, 1.5))  # jitter: readers do not retry in lockstep

    def readinto(self, buf: Any) -> int:
        started = None
        while True:
            try:
                data = self.body.read(len(buf))
                n = len(data)
                buf[:n] = data
                self.pos += n
                return n
            except Exception as e:
                started = started if started is not None else time.monotonic()
                self._give_up_or_wait(e, started, self.settings.backoff_s)
                self._open(started)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def open_shard(url: str, settings: S3Settings = S3Settings()) -> io.BufferedReader:
    """A binary stream of a shard: an S3 object (retried, resumed at its offset) or a local file."""
    if url.startswith("s3://"):
        return io.BufferedReader(_S3Stream(url, settings), buffer_size=1 << 20)
    path = url[len("file://") :] if url.startswith("file://") else url
    return open(path, "rb")


def epoch_shards(urls: list[str], epoch: int, seed: int, rank: int, world: int, worker: int = 0, workers: int = 1):
    """This (rank, worker)'s shards of one epoch: the list shuffled by (seed, epoch), dealt round-robin to the
    world's ranks, then to the rank's DataLoader workers. Disjoint, and together the whole list."""
    if not 0 <= rank < world or not 0 <= worker < workers:
        raise ValueError(f"rank {rank} of {world}, worker {worker} of {workers}")
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[rank::world][worker::workers]


SPOOL_BYTES = 32 << 20  # a fetched shard stays in memory up to this size, then spills to a temporary file


def read_hashed(url: str, settings: S3Settings = S3Settings()) -> tuple[BinaryIO, str, int]:
    """(the shard readable from its start, the sha256 of its bytes, its size), reading it once: an s3:// object is
    fetched whole into a spooled temporary file, hashed on the way; a local file is hashed, then opened."""
    h, size = hashlib.sha256(), 0
    if url.startswith("s3://"):
        out: BinaryIO = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # type: ignore[assignment]
        try:
            with open_shard(url, settings) as src:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except BaseException:
            out.close()
            raise
        out.seek(0)
        return out, h.hexdigest(), size
    with open_shard(url, settings) as src:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return open_shard(url, settings), h.hexdigest(), size


def fetch_shard(url: str, settings: S3Settings = S3Settings(), sha256: str | None = None) -> BinaryIO:
    """The shard, readable from its start (`read_hashed`), its bytes checked against `sha256` when given. A
    mismatch is read once more (a transfer that went wrong), then raises ShardChecksumError."""
    for attempt in (1, 2):
        out, digest, _ = read_hashed(url, settings)
        if sha256 is None or digest == sha256:
            return out
        out.close()
        if attempt == 2:
            raise ShardChecksumError(f"{url}: sha256 {digest[:12]}... differs from the manifest's "
                                     f"{sha256[:12]}... (read twice)")  # fmt: skip
    raise AssertionError("unreachable")


class ShardFetcher:
    """Opens one reader's shards in order. s3:// shards with `settings.read_ahead` > 0, and every shard when
    `settings.verify`, are fetched whole by `fetch_shard` in a background thread, up to read_ahead shards ahead
    (`ahead(urls)` names the next ones); others are streamed (`open_shard`). `checksums`: url -> sha256."""

    def __init__(self, settings: S3Settings, checksums: dict[str, str] | None = None) -> None:
        self.settings, self.checksums = settings, checksums or {}
        self.pending: dict[str, Future] = {}
        self.pool: ThreadPoolExecutor | None = None

    def _whole(self, url: str) -> bool:
        return self.settings.verify or (url.startswith("s3://") and self.settings.read_ahead > 0)

    def ahead(self, urls: list[str]) -> None:
        """Start fetching the shards to be read next (at most read_ahead of them)."""
        for url in urls[: self.settings.read_ahead]:
            if self._whole(url) and url not in self.pending:
                self.pool = self.pool or ThreadPoolExecutor(1, thread_name_prefix="shard-fetch")
                sha = self.checksums.get(url) if self.settings.verify else None
                self.pending[url] = self.pool.submit(fetch_shard, url, self.settings, sha)

    def open(self, url: str) -> BinaryIO:
        if url in self.pending:
            return self.pending.pop(url).result()
        if self._whole(url):
            return fetch_shard(url, self.settings, self.checksums.get(url) if self.settings.verify else None)
        return open_shard(url, self.settings)

    def close(self) -> None:
        for future in self.pending.values():
            if not future.cancel():  # running or done: its file is closed once it is there
                future.add_done_callback(_close_result)
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def _close_result(future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def samples(
    urls: list[str],
    settings: S3Settings = S3Settings(),
    handler: Callable[[Exception], bool] | None = None,
    opener: Callable[[str], BinaryIO] | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples ({"__key__": ..., "png": bytes, ...}) of `urls`, in order, one shard open at a time
    (`opener(url)`: a binary file; `open_shard` by default)."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    handler = handler or wds.reraise_exception
    opener = opener or (lambda url: open_shard(url, settings))

    def streams():
        for url in urls:
            stream = opener(url)
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    return group_by_keys(tar_file_expander(streams(), handler=handler), handler=handler)


def upload_shard_set(root: str | os.PathLike, url: str, settings: S3Settings = S3Settings(),
                     part_mb: int = 64) -> dict[str, Any]:  # fmt: skip
    """Upload a local shard set (its manifest's shards, then the manifest last, so a reader never finds a
    manifest whose shards are missing) under `url` (s3://bucket/prefix/); objects larger than `part_mb` go up
    in multipart uploads. Each shard's size is checked on the server. Returns the manifest."""
    from boto3.s3.transfer import TransferConfig

    from megadalle.data.shards import MANIFEST, read_manifest

    if not url.startswith("s3://"):
        raise ValueError(f"upload target must be s3://bucket/prefix/, got {url!r}")
    manifest = read_manifest(root)
    bucket, prefix = _split_s3(url.rstrip("/") + "/")
    c = client(settings)
    transfer = TransferConfig(multipart_threshold=part_mb << 20, multipart_chunksize=part_mb << 20)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            key = prefix + shard["path"]
            try:
                c.upload_file(str(Path(root) / shard["path"]), bucket, key, Config=transfer)
                size = c.head_object(Bucket=bucket, Key=key)["ContentLength"]
            except Exception as e:
                raise S3Error(f"cannot upload {shard['path']} ({_where(settings, bucket, key)}): "
                              f"{_code(e) or type(e).__name__}") from None  # fmt: skip
            if size != shard["bytes"]:
                raise S3Error(f"{_where(settings, bucket, key)} holds {size} bytes, the manifest says {shard['bytes']}")
    c.upload_file(str(Path(root) / MANIFEST), bucket, prefix + MANIFEST)
    return manifest


def read_remote_manifest(url: str, settings: S3Settings = S3Settings()) -> dict[str, Any]:
    """The manifest of a shard set under s3://bucket/prefix/."""
    import json

    from megadalle.data.shards import FORMAT, MANIFEST

    bucket, prefix = _split_s3(url.rstrip("/") + "/")
    with open_shard(f"s3://{bucket}/{prefix}{MANIFEST}", settings) as f:
        manifest = json.loads(f.read())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{url}{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify_remote(url: str, settings: S3Settings = S3Settings()) -> int:
    """Stream every shard of the set under `url` and check its sha256 against the manifest; the sample count."""
    from megadalle.data.shards import shard_records

    manifest = read_remote_manifest(url, settings)
    total = 0
    for split in manifest["splits"]:
        for shard_url, shard in shard_records(url, split, settings):
            h = hashlib.sha256()
            with open_shard(shard_url, settings) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != shard["sha256"]:
                bucket, key = _split_s3(shard_url)
                raise S3Error(f"{_where(settings, bucket, key)}: sha256 {h.hexdigest()[:12]}... differs from the "
                              f"manifest's {shard['sha256'][:12]}...")  # fmt: skip
            total += shard["samples"]
    return total
