"""A megadalle manifest (counts, sizes, sha256) for shards that have none, as img2dataset writes them
(tools/index_shards.py is the command line).

Sources: anything s3.list_shards names (a folder or s3://bucket/prefix/ of .tar files, a brace pattern, one .tar, a
.txt list of shard URLs). The manifest's shard paths are whole URLs or absolute paths, so `--data.shards=OUT` reads
the shards where they are and `--data.verify_sha256=true` checks them. Each shard is read once, hashed on the way
and its samples counted as training reads them ("read"); "samples" is img2dataset's count (its `_stats.json`)
where there is one, else what the tar holds; a shard holding fewer, or corrupt tar data, is "damaged". Resumable:
each finished shard is appended (fsync'ed) to OUT/manifest.json.partial, or for an s3:// OUT to a local state file
(default ./index_shards.<hash of OUT>.partial; a requeue on another node needs --state on shared storage); a rerun
skips the shards listed there. The zeroshot split is empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

from megadalle.data.s3 import S3Error, S3Settings, TarDamage, list_shards, put_object, read_hashed, samples
from megadalle.data.shards import FORMAT, MANIFEST, expected_samples, write_json_atomic


def index_shard(url: str, settings: S3Settings) -> dict[str, Any]:
    """One shard's manifest record: "path" (the URL), "samples", "read", "bytes", "sha256", and "damaged" (why)
    where the tar holds fewer samples than its count or corrupt data. An unreadable object raises S3Error."""
    f, sha256, size = read_hashed(url, settings)
    damage = TarDamage()  # as training reads: corrupt tar data is read past, and counted
    with f:
        read = sum(1 for _ in samples([url], settings, handler=damage, opener=lambda _: f))
    expected = expected_samples(url, settings)
    record: dict[str, Any] = {"path": url, "samples": read if expected is None else expected, "read": read,
                              "bytes": size, "sha256": sha256}  # fmt: skip
    if damage.seen or read < record["samples"]:
        record["damaged"] = f"{damage.reason}: {read} of {record['samples']} samples read"
    return record


def _shard_url(url: str) -> str:
    """An s3:// URL as it is; a local shard as an absolute path, which must exist."""
    if url.startswith("s3://"):
        return url
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"{url}: only s3:// and local shards can be read")
    path = os.path.abspath(url.removeprefix("file://"))
    if not Path(path).is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    return path


def _load_partial(path: Path) -> dict[str, dict[str, Any]]:
    """url -> record of the shards a previous run finished (a line cut by a crash: that shard is indexed again)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    text = path.read_text()
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            record = json.loads(line)
            done[record["path"]] = record
    if text and not text.endswith("\n"):
        with open(path, "a") as f:
            f.write("\n")
    return done


def _write_manifest(out: str, manifest: dict[str, Any], settings: S3Settings) -> None:
    if out.startswith("s3://"):
        put_object(out.rstrip("/") + "/" + MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n", settings)
    else:
        write_json_atomic(Path(out) / MANIFEST, manifest)


def index_shards(sources: dict[str, str], out: str, workers: int = 4, state: str | None = None,
                 settings: S3Settings | None = None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Index the shards of each split's source (`{"train": SRC, "val": SRC}`) into `out`/manifest.json, `workers`
    processes reading shards; resumable through the `state` file (see the module docstring). Returns (the
    manifest, what this run did: "before" shards already indexed, "now" read now, "state" file, "damaged" records,
    "read" samples, "bytes")."""
    t0, settings = time.time(), settings or S3Settings()
    urls: dict[str, list[str]] = {}
    for split, src in sources.items():
        try:
            urls[split] = [_shard_url(u) for u in list_shards(src, settings)]
        except (OSError, ValueError, S3Error) as e:
            raise ValueError(f"--{split} {src}: {e}") from None
    if not out.startswith("s3://"):
        Path(out).mkdir(parents=True, exist_ok=True)
    log_path = Path(state) if state else (Path(out) / (MANIFEST + ".partial"))
    if not state and out.startswith("s3://"):
        log_path = Path(f"index_shards.{hashlib.sha256(out.encode()).hexdigest()[:12]}.partial")
    done = _load_partial(log_path)
    every = list(dict.fromkeys(u for split in urls.values() for u in split))  # a shard in two sources: read once
    todo = [u for u in every if u not in done]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    workers = min(workers, len(todo))
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext()
    with open(log_path, "a") as log, pool:
        work = partial(index_shard, settings=settings)
        for record in pool.imap_unordered(work, todo) if workers > 1 else map(work, todo):
            log.write(json.dumps(record) + "\n")
            log.flush()
            os.fsync(log.fileno())
            done[record["path"]] = record
    splits: dict[str, Any] = {split: {"samples": sum(done[u]["samples"] for u in us), "shards": [done[u] for u in us]}
                              for split, us in urls.items()}  # fmt: skip
    splits["zeroshot"] = {"samples": 0, "shards": []}  # readers evaluate it when a set has one; this has none
    damaged = [done[u] for u in every if "damaged" in done[u]]
    manifest = {"format": FORMAT, "created_by": "tools/index_shards.py", "sources": sources,
                "samples": sum(s["samples"] for s in splits.values()), "splits": splits, "damaged": len(damaged),
                "seconds": round(time.time() - t0, 2)}  # fmt: skip
    _write_manifest(out, manifest, settings)
    log_path.unlink(missing_ok=True)
    run = {"before": len(every) - len(todo), "now": len(todo), "state": str(log_path), "damaged": damaged,
           "read": sum(done[u]["read"] for u in every), "bytes": sum(done[u]["bytes"] for u in every)}  # fmt: skip
    return manifest, run
