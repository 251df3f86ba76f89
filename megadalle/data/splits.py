"""Deterministic train / val / zero-shot splits of the emoji items.

- val: whole concepts (every tone and style), chosen by a hash of the concept: in-distribution captions
  whose concepts the model never saw.
- zeroshot: for a hashed share of the remaining concepts, one skin tone (if the concept has several) and
  one art style (if it has several) are held out: "woman mechanic, dark skin tone" and "red heart in
  openmoji style" never appear in train, while the concept, the tone and the style each do.
- train: the rest.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

from megadalle.data.emoji_sources import ArtItem


def unit_hash(text: str) -> float:
    """A stable value in [0, 1) for a string (sha256, independent of PYTHONHASHSEED)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / float(1 << 48)


def _pick(values: list[str], salt: str) -> str:
    return min(values, key=lambda v: unit_hash(f"{salt}:{v}"))


@dataclass(frozen=True)
class Assignment:
    split: str
    """"train", "val" or "zeroshot"."""
    held_out: tuple[str, ...]
    """For zeroshot items: which combinations are held out, e.g. ("tone", "style")."""


def tone_key(tones: tuple[str, ...]) -> str:
    return ", ".join(tones) or "none"


def assign_splits(items: list[ArtItem], val_percent: float, zeroshot_percent: float) -> list[Assignment]:
    """One Assignment per item, in the order of `items`."""
    by_concept: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_concept[item.concept_and_tones[0]].append(i)
    out: list[Assignment | None] = [None] * len(items)
    for concept, idx in by_concept.items():
        if unit_hash(f"val:{concept}") < val_percent / 100:
            for i in idx:
                out[i] = Assignment("val", ())
            continue
        held_tone = held_style = None
        if unit_hash(f"zeroshot:{concept}") < zeroshot_percent / 100:
            tones = sorted({tone_key(items[i].concept_and_tones[1]) for i in idx} - {"none"})
            if tones and len({tone_key(items[i].concept_and_tones[1]) for i in idx}) > 1:
                held_tone = _pick(tones, f"tone:{concept}")
            styles = sorted({items[i].style for i in idx})
            if len(styles) > 1:
                held_style = _pick(styles, f"style:{concept}")

        def reasons(i: int, t: str | None, s: str | None) -> tuple[str, ...]:
            r = []
            if t is not None and tone_key(items[i].concept_and_tones[1]) == t:
                r.append("tone")
            if s is not None and items[i].style == s:
                r.append("style")
            return tuple(r)

        if all(reasons(i, held_tone, held_style) for i in idx):
            held_style = None  # keep the concept itself in train
        if all(reasons(i, held_tone, held_style) for i in idx):
            held_tone = None
        for i in idx:
            r = reasons(i, held_tone, held_style)
            out[i] = Assignment("zeroshot" if r else "train", r)
    return out  # type: ignore[return-value]
