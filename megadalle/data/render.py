"""Render one ArtItem to a square RGB PNG on a white background."""

from __future__ import annotations

import io

from PIL import Image

from megadalle.data.emoji_sources import ArtItem


def _composite(rgba: Image.Image, size: int) -> Image.Image:
    rgba = rgba.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def render(item: ArtItem, size: int) -> Image.Image:
    """The item's artwork at `size` x `size`; raises ValueError/OSError on unreadable artwork."""
    import resvg_py

    if item.source.startswith("iconify:"):
        from megadalle.data.iconify import icon_svg

        png = resvg_py.svg_to_bytes(svg_string=icon_svg(item.ref), width=size, height=size)
    elif item.ref.endswith(".svg"):
        png = resvg_py.svg_to_bytes(svg_path=item.ref, width=size, height=size)
    else:
        with Image.open(item.ref) as im:
            return _composite(im, size)
    with Image.open(io.BytesIO(bytes(png))) as im:
        return _composite(im, size)


def render_png(item: ArtItem, size: int) -> tuple[bytes | None, str]:
    """(PNG bytes, "") or (None, what went wrong): a worker never raises, so one bad file cannot stop a build."""
    try:
        img = render(item, size)
    except Exception as e:  # noqa: BLE001 - every failure is reported with its reason and counted
        return None, f"{type(e).__name__}: {e}"
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), ""
