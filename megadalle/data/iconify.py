"""Emoji sets from npm `@iconify-json/<set>` (noto, openmoji, fluent-emoji-flat, fxemoji, ...).

Each set is one `icons.json` of SVG bodies keyed by icon names; `chars.json` (where present) maps code
points to icon names, which gives the `emoji` package's name for the caption. The package is fetched once
with `npm pack` into `build/iconify/` and read from there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from megadalle.data.captions import emoji_name, parse_codepoints
from megadalle.data.emoji_sources import ArtItem, Skipped, SourceError, normalized_icon_name

CACHE = Path("build/iconify")


def fetch_iconify(icon_set: str, cache: Path = CACHE) -> Path:
    """Folder holding the set's icons.json, running `npm pack @iconify-json/<set>` if it is not cached."""
    folder = cache / icon_set / "package"
    if (folder / "icons.json").is_file():
        return folder
    if shutil.which("npm") is None:
        raise SourceError(f"emoji source 'iconify:{icon_set}' needs npm on PATH (apt-get install npm)")
    dest = cache / icon_set
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["npm", "pack", f"@iconify-json/{icon_set}", "--silent", "--pack-destination", str(dest)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    tgz = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or not tgz:
        raise SourceError(f"npm pack @iconify-json/{icon_set} failed ({proc.returncode}): {proc.stderr.strip()}")
    with tarfile.open(tgz[-1]) as tar:
        tar.extractall(dest, filter="data")
    if not (folder / "icons.json").is_file():
        raise SourceError(f"@iconify-json/{icon_set}: no package/icons.json in {tgz[-1]}")
    return folder


def iconify_items(icon_set: str, folder: Path | None, skipped: list[Skipped]) -> list[ArtItem]:
    folder = folder or fetch_iconify(icon_set)
    source = f"iconify:{icon_set}"
    try:
        icons = json.loads((folder / "icons.json").read_text())["icons"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise SourceError(f"{source}: cannot read {folder / 'icons.json'}: {e}") from None
    chars_path = folder / "chars.json"
    chars = json.loads(chars_path.read_text()) if chars_path.is_file() else {}
    info_path = folder / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    license_ = info.get("license", {}).get("spdx", "unknown")
    codepoints_of = {}
    for hexseq, icon in chars.items():
        codepoints_of.setdefault(icon, hexseq)
    items = []
    for icon in sorted(icons):
        hexseq = codepoints_of.get(icon, "")
        name = emoji_name(parse_codepoints(hexseq)) if hexseq else ""
        name = name or normalized_icon_name(icon)
        if not name:
            skipped.append(Skipped(source, icon, "no name", "icon has no usable name"))
            continue
        items.append(ArtItem(source, icon_set, f"{folder / 'icons.json'}#{icon}", hexseq, name, license_))
    return items


def icon_svg(ref: str) -> str:
    """The standalone SVG document of an iconify item ref "<icons.json>#<icon>"."""
    path, _, icon = ref.rpartition("#")
    data = _load(path)
    body = data["icons"][icon]
    w = body.get("width", data.get("width", 16))
    h = body.get("height", data.get("height", 16))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'viewBox="{body.get("left", 0)} {body.get("top", 0)} {w} {h}" width="{w}" height="{h}">{body["body"]}</svg>'
    )


_LOADED: dict[str, dict] = {}


def _load(path: str) -> dict:
    if path not in _LOADED:
        _LOADED[path] = json.loads(Path(path).read_text())
    return _LOADED[path]
