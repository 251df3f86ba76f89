"""Webdataset tar shards: the writer, the manifest, checks of both, and the shards a source names.

Layout of a shard set (a local folder, or the same under s3://bucket/prefix/):
    <root>/manifest.json              counts, a sha256 and size per shard, what was skipped and why
    <root>/<split>/<split>-NNNNNN.tar samples "KEY.png" + "KEY.txt" (caption) + "KEY.json" (metadata)

A source without a manifest (img2dataset's output, any webdataset set) is one split's shards: a folder of `.tar`
files, a brace pattern, one `.tar`, or a `.txt` list of URLs (s3.list_shards). Its records carry no counts;
readers take a shard's expected count from img2dataset's `NNNNN_stats.json` beside it when there is one
(`expected_samples`), and tools/index_shards.py writes a manifest for any such set.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import webdataset as wds

if TYPE_CHECKING:
    from megadalle.data.s3 import S3Settings

MANIFEST = "manifest.json"
FORMAT = "megadalle-shards/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


class ShardWriter:
    """Writes samples into `<folder>/<prefix>-NNNNNN.tar`, `max_samples` each; a shard appears under its
    final name only once it is complete (written as `.tar.tmp`, then renamed)."""

    def __init__(self, folder: str | os.PathLike, prefix: str, max_samples: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.records: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def _open(self) -> None:
        final = self.folder / f"{self.prefix}-{len(self.records):06d}.tar"
        self._path = final
        self._tar = wds.TarWriter(str(final) + ".tmp")
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()
        os.replace(str(self._path) + ".tmp", self._path)
        self.records.append(
            {
                "path": f"{self.folder.name}/{self._path.name}",
                "samples": self._count,
                "bytes": self._path.stat().st_size,
                "sha256": sha256_file(self._path),
            }
        )
        self._tar = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.max_samples:
            self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._finish()
        return self.records


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {path}: build shards with tools/make_shards.py") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def split_urls(root: str | os.PathLike, split: str) -> list[str]:
    """Local paths of a split's shards, in manifest order."""
    if str(root).startswith("s3://"):
        raise ValueError(f"{root}: a local shard set was expected (shard_urls reads s3:// sets)")
    return shard_urls(root, split)


def read_any_manifest(root: str | os.PathLike, settings: S3Settings | None = None) -> dict[str, Any]:
    """The manifest of a local shard set or of one under s3://bucket/prefix/ (`settings`: an s3.S3Settings)."""
    if str(root).startswith("s3://"):
        from megadalle.data.s3 import S3Settings, read_remote_manifest

        return read_remote_manifest(str(root), settings or S3Settings())
    return read_manifest(root)


def is_shard_set(source: str | os.PathLike, settings: S3Settings | None = None) -> bool:
    """Whether `source` is a megadalle shard set (a folder or s3:// prefix holding manifest.json), not a source
    without a manifest (a folder of tars, a brace pattern, one .tar, a .txt list of URLs)."""
    source = str(source)
    if source.endswith((".tar", ".txt")) or ("{" in source and ".." in source):
        return False
    if source.startswith("s3://"):
        from megadalle.data.s3 import S3Settings, object_size

        return object_size(source.rstrip("/") + "/" + MANIFEST, settings or S3Settings()) is not None
    path = Path(source[len("file://") :] if source.startswith("file://") else source)
    return (path / MANIFEST).is_file()


def shard_records(
    root: str | os.PathLike, split: str, settings: S3Settings | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The shards of `split`, each as (local path or s3:// URL, its manifest record: "samples", "bytes", "sha256"):
    from the manifest of a shard set `root` (local, or s3://bucket/prefix/), in manifest order; or, for a source
    without a manifest, every shard it names, with empty records (`split` is then only a name)."""
    from megadalle.data.s3 import S3Settings, list_shards

    root = str(root)
    if not is_shard_set(root, settings):
        try:
            return [(url, {}) for url in list_shards(root, settings or S3Settings())]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{root}: neither a shard set (no {MANIFEST}) nor a folder holding .tar shards "
                f"(a brace pattern, a .tar or a .txt list of URLs also name shards)"
            ) from None
    manifest = read_any_manifest(root, settings)
    if split not in manifest["splits"]:
        raise ValueError(f"{root}: no split {split!r} (has {sorted(manifest['splits'])})")
    base = root.rstrip("/") + "/" if root.startswith("s3://") else ""

    def where(path: str) -> str:  # tools/index_shards.py writes whole URLs for a set it did not write
        if "://" in path or path.startswith("/"):
            return path
        return base + path if base else str(Path(root) / path)

    return [(where(s["path"]), s) for s in manifest["splits"][split]["shards"]]


def expected_samples(url: str, settings: S3Settings | None = None) -> int | None:
    """img2dataset's count of the samples it wrote into the shard `.../NNNNN.tar` ("successes" in the
    `NNNNN_stats.json` beside it), or None where there is none."""
    from megadalle.data.s3 import S3Settings, read_object

    if not url.endswith(".tar"):
        return None
    raw = read_object(url[: -len(".tar")] + "_stats.json", settings or S3Settings())
    if raw is None:
        return None
    try:
        return int(json.loads(raw)["successes"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{url[: -len('.tar')]}_stats.json: no sample count ('successes'): {e}") from None


def shard_urls(root: str | os.PathLike, split: str, settings: S3Settings | None = None) -> list[str]:
    """A split's shards, in manifest order: local paths, or s3:// URLs when `root` is s3://bucket/prefix/."""
    return [url for url, _ in shard_records(root, split, settings)]


def verify_shards(root: str | os.PathLike, checksums: bool = True, settings: S3Settings | None = None) -> int:
    """Check every shard's size and (with `checksums`) sha256 against the manifest of the local shard set `root`,
    wherever the shards are (a manifest of tools/index_shards.py may name s3:// objects); return the number of
    samples. Sizes alone are the quick check (tools/demo.py makes it on every run)."""
    from megadalle.data.s3 import S3Settings, object_size, open_shard

    manifest, total = read_manifest(root), 0
    for split in manifest["splits"]:
        for url, rec in shard_records(root, split, settings):
            if url.startswith("s3://") and not checksums:
                size, digest = object_size(url, settings or S3Settings()), rec["sha256"]
            elif url.startswith("s3://"):
                h, size = hashlib.sha256(), 0
                with open_shard(url, settings or S3Settings()) as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
                digest = h.hexdigest() if checksums else rec["sha256"]
            else:
                if not Path(url).is_file():
                    raise FileNotFoundError(f"shard {url} of split {split!r} listed in the manifest is missing")
                size, digest = Path(url).stat().st_size, sha256_file(url) if checksums else rec["sha256"]
            if size != rec["bytes"]:
                raise ValueError(f"shard {url} has {size} bytes, {Path(root) / MANIFEST} says {rec['bytes']}")
            if digest != rec["sha256"]:
                raise ValueError(f"shard {url} does not match its sha256 in {Path(root) / MANIFEST}")
            total += rec["samples"]
    return total
