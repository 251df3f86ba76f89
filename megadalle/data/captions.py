"""Captions from emoji names: lower-case natural phrases with the skin tone split off.

":woman_mechanic_medium_skin_tone:"  ->  concept "woman mechanic", tones ("medium skin tone",)
caption "woman mechanic, medium skin tone" (+ " in openmoji style" when the style is wanted)
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache

# Longest alternatives first so "medium-light skin tone" is not read as "light skin tone".
_TONE = re.compile(r"\b(medium[- ]light|medium[- ]dark|medium|light|dark)[- ]skin[- ]tone\b")
_VARIATION_SELECTORS = {0xFE0E, 0xFE0F}


def split_tones(name: str) -> tuple[str, tuple[str, ...]]:
    """Split a lower-case name into its concept and its skin tones, in order of appearance."""
    tones = tuple(m.group(1).replace(" ", "-") + " skin tone" for m in _TONE.finditer(name))
    concept = _TONE.sub(" ", name)
    concept = re.sub(r"\s+", " ", concept).strip(" ,:")
    concept = re.sub(r"\s*,\s*(,\s*)+", ", ", concept)
    return concept, tones


def normalize_name(raw: str) -> str:
    """ ":woman_mechanic:" / "woman-mechanic" / "WOMAN MECHANIC" -> "woman mechanic"."""
    s = raw.strip().strip(":").replace("_", " ").lower()
    return re.sub(r"\s+", " ", s).strip()


def make_caption(concept: str, tones: tuple[str, ...], style: str | None) -> str:
    """The caption text: concept, then tones after a comma, then the style if given."""
    caption = concept
    if tones:
        caption += ", " + ", ".join(tones)
    if style:
        caption += f" in {style} style"
    return caption


def strip_variation(codepoints: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(c for c in codepoints if c not in _VARIATION_SELECTORS)


@cache
def _emoji_names() -> dict[tuple[int, ...], str]:
    import emoji

    return {strip_variation(tuple(map(ord, seq))): data["en"] for seq, data in emoji.EMOJI_DATA.items()}


_TONE_MODIFIERS = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}


def emoji_name(codepoints: tuple[int, ...]) -> str:
    """The normalised English name of an emoji sequence, "" if neither `emoji` nor Unicode names it.

    A toned sequence the `emoji` package does not list (newer than its data) is named from its untoned
    base plus the tones of its Fitzpatrick modifiers.
    """
    cps = strip_variation(codepoints)
    raw = _emoji_names().get(cps)
    if raw is None:
        base = tuple(c for c in cps if c not in _TONE_MODIFIERS)
        tones = [_TONE_MODIFIERS[c] for c in cps if c in _TONE_MODIFIERS]
        if tones and base in _emoji_names():
            return normalize_name(_emoji_names()[base]) + " " + " ".join(tones)
    if raw is None and len(cps) == 1:
        raw = unicodedata.name(chr(cps[0]), "")
    return normalize_name(raw or "")


def parse_codepoints(stem: str) -> tuple[int, ...]:
    """ "1f469-200d-1f527" -> (0x1F469, 0x200D, 0x1F527); ValueError when the stem is not hex code points."""
    return tuple(int(part, 16) for part in stem.split("-"))
