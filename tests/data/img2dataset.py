"""An img2dataset-style shard set made from the emoji art (no download), as a user's CC3M or LAION download looks:
`00000.tar`, `00001.tar`, ... each sample `KEY.jpg` (or `.webp`, `.png`) + `KEY.txt` + `KEY.json`, and
`00000_stats.json` ("successes") beside each tar; no megadalle manifest. Images at mixed sizes and aspect ratios,
some RGBA, grayscale, CMYK or EXIF-rotated; planted faults (FAULTS): an undecodable member in two shards, an image
too small and one too wide for the filters (MIN_SIDE, MAX_ASPECT), and the last shard cut short mid-member."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

SHARDS, PER_SHARD, VAL = 4, 24, 16
MIN_SIDE, MAX_ASPECT = 16, 3.0
FAULTS = {"undecodable image": 2, "image too small": 1, "aspect ratio out of range": 1}
"""Samples skipped by reason in one epoch over the train shards, besides what the cut shard lost."""
CUT = f"{SHARDS - 1:05d}.tar"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _member(img: Image.Image, i: int) -> dict[str, bytes]:
    """Sample i's image member: a format, size and mode by i."""
    kind = i % 6
    if kind == 0:
        return {"jpg": _encode(img.resize((48, 40)), "JPEG", quality=90)}
    if kind == 1:
        return {"webp": _encode(img.resize((40, 56)), "WEBP", quality=90)}
    if kind == 2:
        return {"png": _encode(img.convert("RGBA").resize((64, 64)), "PNG")}
    if kind == 3:
        return {"jpg": _encode(img.convert("L").resize((36, 36)), "JPEG")}
    if kind == 4:
        return {"jpg": _encode(img.convert("CMYK").resize((40, 40)), "JPEG")}
    exif = Image.Exif()
    exif[0x0112] = 8
    return {"jpg": _encode(img.resize((44, 32)).transpose(Image.Transpose.ROTATE_270), "JPEG", exif=exif.tobytes())}


def _write(folder: Path, index: int, rows: list[dict[str, bytes]]) -> Path:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index:05d}.tar"
    with wds.TarWriter(str(path)) as tar:
        for row in rows:
            tar.write(row)
    stats = {"count": len(rows) + 2, "successes": len(rows), "failed_to_download": 2, "failed_to_resize": 0}
    (folder / f"{index:05d}_stats.json").write_text(json.dumps(stats))
    return path


def build(emoji_shards: Path, out: Path) -> tuple[Path, Path]:
    """(train folder, val folder) of img2dataset-style shards from the emoji set's train and val splits."""
    from megadalle.data.s3 import samples
    from megadalle.data.shards import split_urls

    def rows(split: str, n: int) -> list[tuple[Image.Image, bytes]]:
        got = []
        for s in samples(split_urls(emoji_shards, split)):
            got.append((Image.open(io.BytesIO(s["png"])).convert("RGB"), s["txt"]))
            if len(got) == n:
                return got
        raise ValueError(f"{emoji_shards} has {len(got)} {split} samples, {n} wanted")

    train = rows("train", SHARDS * PER_SHARD)
    for shard in range(SHARDS):
        out_rows = []
        for j in range(PER_SHARD):
            i = shard * PER_SHARD + j
            img, caption = train[i]
            member = _member(img, i)
            if (shard, j) in ((1, 5), (2, 7)):  # a corrupt member in two shards
                member = {"jpg": _encode(img, "JPEG")[:50]}
            elif (shard, j) == (0, 3):
                member = {"jpg": _encode(img.resize((12, 12)), "JPEG")}
            elif (shard, j) == (0, 8):
                member = {"jpg": _encode(img.resize((128, 32)), "JPEG")}
            key = f"{shard:05d}{j:04d}"
            meta = json.dumps({"key": key, "status": "success", "width": 64, "height": 64}).encode()
            out_rows.append({"__key__": key, **member, "txt": caption, "json": meta})
        path = _write(out / "train", shard, out_rows)
    raw = path.read_bytes()  # the last shard, cut in the middle of a member two thirds in
    path.write_bytes(raw[: (len(raw) * 2 // 3) // 512 * 512 + 100])
    val = rows("val", VAL)
    _write(out / "val", 0, [{"__key__": f"9{i:08d}", **_member(img, i), "txt": c} for i, (img, c) in enumerate(val)])
    return out / "train", out / "val"


def image_of(sample: dict) -> np.ndarray:
    from megadalle.data.images import decode_image, image_member

    return decode_image(image_member(sample, "jpg;jpeg;png;webp"))


if __name__ == "__main__":  # python -m tests.data.img2dataset EMOJI_SHARDS OUT: the README's stand-in download
    import sys

    train, val = build(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"img2dataset-style shards: {train}/ ({SHARDS} tars), {val}/ (1 tar), each with its _stats.json")
