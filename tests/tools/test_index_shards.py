"""tools/index_shards.py on an img2dataset-style set made here (3 tars of jpg + txt + json samples with a
`NNNNN_stats.json` beside each, the last tar cut short mid-member, and a val list): the manifest's counts, sizes and
checksums, a training stream over it that counts what the cut tar lost, a resumed run, errors, and the same set on a
real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from megadalle.config import Data
from megadalle.data.loader import SkipCounter, data_splits, train_images
from megadalle.data.shards import read_manifest, shard_records, verify_shards
from tests.conftest import REPO, python

PER_SHARD = (6, 5, 7)  # samples in each train tar, as its _stats.json says
CUT_AT = 3  # the last tar is cut in the middle of this sample's jpg: samples 0..2 remain
VAL = 4


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (37 * i % 256, 90, 200 - i)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as tar:
        for j in range(n):
            key = f"{path.stem}{j:04d}"
            tar.write({"__key__": key, "jpg": _jpeg(j), "txt": f"a photo of thing {j}".encode(), "json": {"key": key}})
    (path.parent / f"{path.stem}_stats.json").write_text(json.dumps({"successes": n, "count": n + 2}))


@pytest.fixture(scope="module")
def img_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/train/0000{0,1,2}.tar (the last cut short), <root>/val/00000.tar and <root>/val.txt naming it."""
    root = tmp_path_factory.mktemp("img2dataset")
    for index, n in enumerate(PER_SHARD):
        _write(root / "train" / f"{index:05d}.tar", n)
    cut = root / "train" / f"{len(PER_SHARD) - 1:05d}.tar"
    with tarfile.open(cut) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith(".jpg")][CUT_AT]
    os.truncate(cut, member.offset_data + member.size // 2)
    _write(root / "val" / "00000.tar", VAL)
    (root / "val.txt").write_text("# the val shards\nval/00000.tar\n")
    return root


def tars(root: Path) -> list[str]:
    return [str(root / "train" / f"{i:05d}.tar") for i in range(len(PER_SHARD))]


def index(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python(), "tools/index_shards.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def check_records(records: list[dict], paths: list[str], local: list[str]) -> None:
    assert [r["path"] for r in records] == paths
    assert [r["samples"] for r in records] == list(PER_SHARD)  # img2dataset's counts, the cut tar's included
    assert [r["read"] for r in records] == [*PER_SHARD[:-1], CUT_AT]
    for record, path in zip(records, local, strict=True):
        data = Path(path).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["bytes"] == len(data)
    assert [r.get("damaged") for r in records[:-1]] == [None, None]
    assert records[-1]["damaged"] == f"corrupt tar (ReadError): {CUT_AT} of {PER_SHARD[-1]} samples read"


def test_index_then_train_over_it(img_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "indexed"
    rel = os.path.relpath(img_set / "train", REPO)  # a relative source: the manifest holds absolute paths
    proc = index("--train", rel, "--val", str(img_set / "val.txt"), "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(out)
    train = manifest["splits"]["train"]
    check_records(train["shards"], tars(img_set), tars(img_set))
    assert train["samples"] == sum(PER_SHARD) and manifest["samples"] == sum(PER_SHARD) + VAL
    assert manifest["splits"]["val"]["shards"][0]["path"] == str(img_set / "val" / "00000.tar")
    assert manifest["splits"]["zeroshot"] == {"samples": 0, "shards": []} and manifest["damaged"] == 1
    assert f"damaged: {tars(img_set)[-1]}: corrupt tar" in proc.stdout
    assert "indexed 4 shards (4 read now): 22 samples, 18 read" in proc.stdout and "; 1 damaged" in proc.stdout
    assert not (out / "manifest.json.partial").exists()
    assert [url for url, _ in shard_records(out, "train")] == tars(img_set)
    assert verify_shards(out) == sum(PER_SHARD) + VAL  # sizes and checksums of the shards where they are

    data = Data(shards=str(out), verify_sha256=True, shuffle_buffer=0, image_keys="jpg")
    assert data_splits(data) == ["train", "val", "zeroshot"]
    skips = SkipCounter()
    stream = train_images(data, 32, 4, rank=0, seed=0, skips=skips, world=1)
    stream.max_epochs = 1
    delivered = sum(len(captions) for _, captions in stream)
    assert delivered == sum(PER_SHARD[:-1]) + CUT_AT
    assert stream.skips.by_reason() == {"corrupt tar (ReadError)": PER_SHARD[-1] - CUT_AT}


def _true(path: str) -> dict:
    data = Path(path).read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_rerun_skips_the_shards_already_indexed(img_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    out.mkdir()
    first = {"path": tars(img_set)[0], "samples": PER_SHARD[0], "read": PER_SHARD[0], "bytes": 1, "sha256": "x" * 64}
    cut_line = '{"path": "' + tars(img_set)[1]  # a record cut by a crash mid-write: that shard is read again
    (out / "manifest.json.partial").write_text(json.dumps(first) + "\n" + cut_line)
    proc = index("--train", str(img_set / "train"), "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping 1 already indexed" in proc.stdout and "indexed 3 shards (2 read now)" in proc.stdout
    records = read_manifest(out)["splits"]["train"]["shards"]
    assert records[0] == first  # taken from the partial file, not read again
    check_records([{**records[0], **_true(tars(img_set)[0])}, *records[1:]], tars(img_set), tars(img_set))
    assert not (out / "manifest.json.partial").exists()


def test_shards_without_stats_count_what_they_hold(img_set: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    for i in (1, 2):  # a whole tar and the cut one, with no _stats.json beside them
        (lone / f"{i:05d}.tar").write_bytes(Path(tars(img_set)[i]).read_bytes())
    proc = index("--train", f"{lone}/{{00001..00002}}.tar", "--out", str(tmp_path / "out"), "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_manifest(tmp_path / "out")["splits"]["train"]["shards"]
    assert [(r["samples"], r["read"], r.get("damaged")) for r in records] == [
        (PER_SHARD[1], PER_SHARD[1], None),
        (CUT_AT, CUT_AT, f"corrupt tar (ReadError): {CUT_AT} of {CUT_AT} samples read"),
    ]


def test_bad_sources_are_errors_without_tracebacks(img_set: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "gone.txt").write_text("gone.tar\n")
    cases = {"nothing": "not exist", "empty": "no .tar shards", "list.txt": "does not exist", "gone.txt": "gone.tar"}
    for name, says in cases.items():
        source = str(tmp_path / name)
        proc = index("--train", source, "--out", str(tmp_path / "out"), "--workers", "1")
        assert proc.returncode == 2, proc.stdout
        assert f"index_shards: error: --train {source}: " in proc.stderr and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.distributed  # a server process (as tests/data/test_s3.py)
def test_index_a_set_on_s3(s3_server, img_set: Path, tmp_path: Path) -> None:
    from megadalle.data.s3 import S3Settings, client, read_remote_manifest
    from tests.s3server import BUCKET

    prefix = f"img2dataset-{uuid.uuid4().hex[:8]}/"
    c = client(S3Settings())
    for path in sorted((img_set / "train").iterdir()):
        c.upload_file(str(path), BUCKET, prefix + path.name)
    urls = [f"s3://{BUCKET}/{prefix}{Path(p).name}" for p in tars(img_set)]

    out = tmp_path / "indexed"
    proc = index("--train", f"s3://{BUCKET}/{prefix}", "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_records(read_manifest(out)["splits"]["train"]["shards"], urls, tars(img_set))
    assert [url for url, _ in shard_records(out, "train")] == urls

    state = tmp_path / "state.partial"
    proc = index("--train", f"s3://{BUCKET}/{prefix}", "--out", f"s3://{BUCKET}/{prefix}", "--state", str(state),
                 "--workers", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"manifest: s3://{BUCKET}/{prefix}manifest.json" in proc.stdout and not state.exists()
    check_records(read_remote_manifest(f"s3://{BUCKET}/{prefix}")["splits"]["train"]["shards"], urls, tars(img_set))
    assert [url for url, _ in shard_records(f"s3://{BUCKET}/{prefix}", "train")] == urls

    proc = index("--train", f"s3://{BUCKET}/{prefix}missing-{{0..1}}.tar", "--out", str(tmp_path / "o2"))
    assert proc.returncode == 2 and "index_shards: error: " in proc.stderr and "Traceback" not in proc.stderr
    assert f"{prefix}missing-" in proc.stderr
