"""Image augmentations of the paper's listings, on uint8 HWC numpy arrays."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1] (a copy: decoded arrays may be read-only)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> contiguous (H, W, 3) uint8, for PIL."""
    return np.ascontiguousarray(img.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())


def _random_crop(img: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return img[top : top + size, left : left + size]


def _check_size(img: np.ndarray, target: int) -> int:
    """The short side of (H, W, 3) img, which must be at least target."""
    s_min = min(img.shape[:2])
    if s_min < target:
        raise ValueError(f"image of {img.shape[1]}x{img.shape[0]} is smaller than the target {target}")
    return s_min


def _area_resize(img: np.ndarray, side: int) -> np.ndarray:
    """(s, s, 3) -> (side, side, 3) by area averaging (PIL's BOX = TF's AREA of the listings)."""
    if side == img.shape[0]:
        return img
    return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BOX))


def near_center_offset(slack: int, rng: random.Random) -> int:
    """Listing 2's offset of the square along one axis: an integer drawn uniformly in [3/8, 5/8] x slack.
    For slack 1 and 3 no integer lies in that interval; the central offset slack // 2 is used."""
    lo, hi = -(-3 * slack // 8), 5 * slack // 8  # ceil(3 slack / 8), floor(5 slack / 8)
    return rng.randint(lo, hi) if lo <= hi else slack // 2


def dvae_augment(img: np.ndarray, target: int, rng: random.Random) -> np.ndarray:
    """Listing 1: random square crop of the short side, area-resize to a random side in
    [9/8, 12/8] x target (bounded by the short side), random crop to target, random horizontal flip (p = 1/2).
    (H, W, 3) -> (target, target, 3)."""
    s_min = _check_size(img, target)
    img = _random_crop(img, s_min, rng)  # (s_min, s_min, 3)
    t_min, t_max = min(s_min, round(9 / 8 * target)), min(s_min, round(12 / 8 * target))
    img = _random_crop(_area_resize(img, rng.randint(t_min, t_max)), target, rng)  # (target, target, 3)
    if rng.random() < 0.5:
        img = np.ascontiguousarray(img[:, ::-1])  # (target, target, 3) mirrored left-right
    return img


def prior_augment(img: np.ndarray, target: int, rng: random.Random) -> np.ndarray:
    """Listing 2 (the transformer's data): square crop of the short side near the centre (offset uniform in
    [3/8, 5/8] of the slack), area-resize to a random side in [target, 9/8 x target] (bounded by the short
    side), random crop to target; no flip, since images may contain text. (H, W, 3) -> (target, target, 3)."""
    s_min = _check_size(img, target)
    h, w = img.shape[:2]
    top, left = near_center_offset(h - s_min, rng), near_center_offset(w - s_min, rng)
    img = img[top : top + s_min, left : left + s_min]  # (s_min, s_min, 3)
    t = rng.randint(target, min(s_min, round(9 / 8 * target)))
    return _random_crop(_area_resize(img, t), target, rng)  # (target, target, 3)


def center_resize(img: np.ndarray, target: int) -> np.ndarray:
    """Evaluation view: central square crop, area-resize to target."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top : top + s, left : left + s]
    if s != target:
        img = np.asarray(Image.fromarray(img).resize((target, target), Image.Resampling.BOX))
    return img
