"""Images as users' shard sets hold them (img2dataset writes `KEY.jpg`, LAION and CC3M also webp and png): the member
chosen among `data.image_keys`, decoded to RGB whatever its mode, oriented by its EXIF tag, and checked against
the documented filters. Every rejection is a SkipSampleError whose reason the loaders count.

Modes: RGBA, LA and palette images with transparency are composited on white (a transparent background reads as
paper, not as black); grayscale and CMYK are converted; 16-bit grayscale ("I;16", "I") is scaled to 8 bits.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from megadalle.data.stream import SkipSampleError

DEFAULT_KEYS = "jpg;jpeg;png;webp"


def image_member(sample: dict, keys: str) -> bytes:
    """The bytes of the first of `keys` (webdataset's `a;b;c` convention) the sample holds."""
    for key in keys.split(";"):
        if key and key in sample:
            return sample[key]
    raise SkipSampleError("no image")


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an encoded image, EXIF orientation applied; SkipSampleError when it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(to_rgb(im))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise SkipSampleError("undecodable image") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit integer) grayscale: the top 8 bits
        a = np.asarray(im, dtype=np.uint32 if im.mode == "I" else np.uint16)
        top = a.max() if im.mode == "I" and a.max() > 65535 else 65535
        return Image.fromarray((a.astype(np.float64) * 255 / max(top, 1)).round().astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def check_shape(img: np.ndarray, min_side: int, max_aspect: float) -> None:
    """The documented filters: the shorter side at least `min_side`, long / short side at most `max_aspect` (0: any)."""
    h, w = img.shape[:2]
    if min_side and min(h, w) < min_side:
        raise SkipSampleError("image too small")
    if max_aspect and max(h, w) > max_aspect * min(h, w):
        raise SkipSampleError("aspect ratio out of range")
