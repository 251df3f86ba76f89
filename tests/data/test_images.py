"""Real images as users' shard sets hold them (data/images.py): JPEG, WebP and PNG members of any size, in every
mode a photo collection has (RGBA, palette with transparency, grayscale, CMYK, 16-bit, EXIF-rotated), decoded to
RGB; the documented filters skip and count by reason; a dVAE trains from a set of JPEG members."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megadalle.config import Data
from megadalle.data.images import check_shape, decode_image, image_member
from megadalle.data.loader import SkipCounter, eval_images, train_images
from megadalle.data.stream import SkipSampleError
from tests.conftest import REPO, python


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_every_mode_decodes_to_rgb_with_transparency_on_white_and_exif_applied():
    rgba = Image.new("RGBA", (6, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent: white, not black
    out = decode_image(encode(rgba, "PNG"))
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]
    la = decode_image(encode(Image.new("LA", (3, 3), (0, 0)), "PNG"))
    assert (la == 255).all()
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    p = decode_image(encode(pal, "PNG", transparency=0))
    assert p[0, 0].tolist() == [255, 255, 255] and p[1, 1].tolist() == [10, 20, 30]
    gray = decode_image(encode(Image.new("L", (5, 5), 77), "PNG"))
    assert gray.shape == (5, 5, 3) and (gray == 77).all()
    cmyk = decode_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk.shape == (4, 4, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60  # red
    sixteen = Image.fromarray(np.full((3, 3), 65535 // 2, dtype=np.uint16))
    s = decode_image(encode(sixteen, "PNG"))
    assert s.shape == (3, 3, 3) and abs(int(s[0, 0, 0]) - 128) <= 1
    wide = Image.new("RGB", (8, 4), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = decode_image(encode(wide, "JPEG", exif=exif.tobytes()))
    assert rotated.shape == (8, 4, 3)  # displayed upright: taller than wide
    webp = decode_image(encode(Image.new("RGB", (7, 3), (0, 200, 0)), "WEBP", lossless=True))
    assert webp.shape == (3, 7, 3) and webp[..., 1].min() == 200
    for bad in (b"", b"\xff\xd8\xff\xe0 not a jpeg", encode(wide, "JPEG")[:40]):
        with pytest.raises(SkipSampleError, match="undecodable image"):
            decode_image(bad)


def test_member_choice_and_filters():
    assert image_member({"png": b"p", "jpg": b"j"}, "jpg;jpeg;png;webp") == b"j"
    assert image_member({"webp": b"w"}, "jpg;jpeg;png;webp") == b"w"
    with pytest.raises(SkipSampleError, match="no image"):
        image_member({"gif": b"g"}, "jpg;jpeg;png;webp")
    check_shape(np.zeros((16, 40, 3)), 16, 3.0)
    with pytest.raises(SkipSampleError, match="image too small"):
        check_shape(np.zeros((15, 40, 3)), 16, 3.0)
    with pytest.raises(SkipSampleError, match="aspect ratio out of range"):
        check_shape(np.zeros((16, 49, 3)), 16, 3.0)
    check_shape(np.zeros((1, 1000, 3)), 0, 0.0)  # 0: no filter


PLANTED = {"image too small": 3, "aspect ratio out of range": 3, "undecodable image": 3}


def photo_set(emoji_shards: Path, out: Path) -> Path:
    """The emoji set rewritten as a photo collection: each image re-encoded by its index as JPEG, WebP or PNG in
    another mode or size (EXIF-rotated, upscaled, grayscale, CMYK, RGBA, 16-bit), the PLANTED faults among the
    first 40 train samples; val re-encoded as JPEG."""
    from megadalle.data.s3 import samples
    from megadalle.data.shards import MANIFEST, ShardWriter, read_manifest, split_urls

    manifest = read_manifest(emoji_shards)
    shutil.rmtree(out, ignore_errors=True)
    for split in ("val", "train"):
        writer = ShardWriter(out / split, split, 32)
        n = 0
        for i, sample in enumerate(samples(split_urls(emoji_shards, split))):
            if split == "train" and i == 64:
                break
            img = Image.open(io.BytesIO(sample["png"])).convert("RGB")
            kind = i % 8 if split == "train" else 0
            if split == "train" and i < 27 and i % 3 == 0:  # the planted faults, 3 of each
                kind = 8 + (i // 3) % 3
            member: dict[str, bytes]
            if kind == 0:
                member = {"jpg": encode(img.resize((48, 40)), "JPEG", quality=90)}
            elif kind == 1:
                member = {"webp": encode(img, "WEBP", quality=90)}
            elif kind == 2:
                member = {"png": encode(img.convert("RGBA"), "PNG")}
            elif kind == 3:
                member = {"jpeg": encode(img.convert("L"), "JPEG")}
            elif kind == 4:
                member = {"jpg": encode(img.convert("CMYK"), "JPEG")}
            elif kind == 5:
                a = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
                member = {"png": encode(Image.fromarray(a), "PNG")}
            elif kind == 6:
                exif = Image.Exif()
                exif[0x0112] = 8
                member = {"jpg": encode(img.resize((40, 32)).transpose(Image.Transpose.ROTATE_270), "JPEG",
                                        exif=exif.tobytes())}  # fmt: skip
            elif kind == 7:
                member = {"png": encode(img.resize((64, 64)), "PNG")}
            elif kind == 8:
                member = {"jpg": encode(img.resize((12, 12)), "JPEG")}
            elif kind == 9:
                member = {"jpg": encode(img.resize((128, 32)), "JPEG")}
            else:
                member = {"jpg": encode(img, "JPEG")[:60]}
            writer.write({"__key__": sample["__key__"], **member, "txt": sample["txt"], "json": sample["json"]})
            n += 1
        manifest["splits"][split] = {"samples": n, "shards": writer.close()}
    manifest["splits"].pop("zeroshot", None)
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.mark.distributed  # DataLoader worker processes
def test_a_photo_collection_trains_and_evaluates_with_its_faults_counted(emoji_shards, tmp_path):
    root = photo_set(emoji_shards, tmp_path / "photos")
    data = Data(shards=str(root), num_workers=0, shuffle_buffer=16, min_image_side=16, max_aspect_ratio=3.0)
    stream = train_images(data, 32, 4, 0, 1, SkipCounter(), world=1)
    stream.max_epochs = 1
    images, captions = zip(*(b for b in stream))
    assert sum(len(c) for c in captions) == 64 - sum(PLANTED.values())
    assert stream.skips.by_reason() == PLANTED
    x = np.concatenate([b.numpy() for b in images])
    assert x.shape[1:] == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and x.mean() > 0.5  # emoji on white
    val = list(eval_images(str(root), "val", 32, 8))
    assert sum(len(b[1]) for b in val) == json.loads((root / "manifest.json").read_text())["splits"]["val"]["samples"]
    # train.py end to end: a debug dVAE from the JPEG / WebP / PNG members
    proc = subprocess.run([python(), "megadalle/train.py", "--config", "megadalle/configs/dvae_debug.toml",
                           f"--data.shards={root}", f"--job.run_root={tmp_path}", "--train.steps=4",
                           "--train.eval_every=4", "--data.min_image_side=16", "--data.max_aspect_ratio=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "dvae_debug" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["kind"] == "train"] == [1, 2, 3, 4]
    assert any(m["kind"] == "eval" and np.isfinite(m["psnr_db"]) for m in lines)
