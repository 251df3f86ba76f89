"""tools/make_shards.py --from-folder: a user's folder of images with captions -> a shard set that trains. Every image
and caption round-trips byte for byte; unusable ones are skipped and counted; captions from a CSV or TSV table."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from megadalle.config import Data
from megadalle.data.loader import SkipCounter, eval_images, train_images
from megadalle.data.s3 import samples
from megadalle.data.shards import split_urls, verify_shards
from tests.conftest import REPO, python

FORMATS = [("jpg", "JPEG"), ("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]


def photo_folder(root: Path, n: int = 24) -> dict[str, tuple[bytes, str]]:
    """n images of mixed formats and sizes in nested folders, a .txt caption beside each; returns relpath ->
    (bytes, caption) of the usable ones, and plants one without a caption and one that cannot be decoded."""
    rng = np.random.default_rng(0)
    kept = {}
    for i in range(n):
        ext, fmt = FORMATS[i % 4]
        rel = f"{'trip' if i % 2 else 'home'}/img_{i:03d}.{ext}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(buf, format=fmt)
        path.write_bytes(buf.getvalue())
        caption = f"a photo number {i}"
        path.with_suffix(".txt").write_text(caption)
        kept[rel] = (buf.getvalue(), caption)
    (root / "home/img_000.txt").unlink()  # no caption
    (root / "trip/img_001.jpeg").write_bytes(b"\xff\xd8 not an image")  # undecodable
    del kept["home/img_000.jpg"], kept["trip/img_001.jpeg"]
    return kept


def stored(out: Path) -> dict[str, tuple[bytes, str]]:
    got = {}
    for split in ("train", "val"):
        for s in samples(split_urls(out, split)):
            image = next(s[k] for k in ("jpg", "jpeg", "png", "webp") if k in s)
            got[json.loads(s["json"])["file"]] = (image, s["txt"].decode())
    return got


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python(), "tools/make_shards.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_from_folder_round_trips_every_image_and_caption_and_trains(tmp_path):
    kept = photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    proc = make("--from-folder", str(tmp_path / "photos"), "--out", str(out), "--data.val_percent=25")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["by_reason"] == {"no caption": 1, "undecodable image": 1}
    assert manifest["samples"] == len(kept) == 22 and verify_shards(out) == 22
    assert 0 < manifest["splits"]["val"]["samples"] < manifest["splits"]["train"]["samples"]
    assert stored(out) == kept  # byte for byte, captions included
    again = tmp_path / "again"
    assert make("--from-folder", str(tmp_path / "photos"), "--out", str(again), "--data.val_percent=25").returncode == 0
    val = lambda root: {json.loads(s["json"])["file"] for s in samples(split_urls(root, "val"))}  # noqa: E731
    assert val(again) == val(out) and len(val(out)) == manifest["splits"]["val"]["samples"]  # a stable split
    stream = train_images(Data(shards=str(out), num_workers=0, shuffle_buffer=4), 32, 4, 0, 1, SkipCounter(), world=1)
    stream.max_epochs = 1
    assert sum(len(c) for _, c in stream) == manifest["splits"]["train"]["samples"] and stream.skips.total == 0
    assert sum(len(b[1]) for b in eval_images(str(out), "val", 32, 4)) == manifest["splits"]["val"]["samples"]


def test_captions_from_a_csv_or_tsv_table_and_clear_errors(tmp_path):
    kept = photo_folder(tmp_path / "photos")
    for txt in (tmp_path / "photos").rglob("*.txt"):
        txt.unlink()
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        table = tmp_path / f"captions{suffix}"
        with open(table, "w", newline="") as f:
            w = csv.writer(f, delimiter=delimiter)
            w.writerow(["file", "caption"])
            for rel, (_, caption) in kept.items():
                w.writerow([rel, caption.upper()])
        out = tmp_path / f"shards{suffix}"
        proc = make("--from-folder", str(tmp_path / "photos"), "--captions", str(table), "--out", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert stored(out) == {rel: (b, c.upper()) for rel, (b, c) in kept.items()}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,words\nx.jpg,hello\n")
    proc = make("--from-folder", str(tmp_path / "photos"), "--captions", str(bad), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "needs a path column" in proc.stderr and "['name', 'words']" in proc.stderr
    proc = make("--from-folder", str(tmp_path / "nothing"), "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "no such folder" in proc.stderr
