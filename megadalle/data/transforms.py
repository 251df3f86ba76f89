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


def dvae_augment(img: np.ndarray, target: int, rng: random.Random) -> np.ndarray:
    """Listing 1: random square crop of the short side, area-resize to a random side in
    [9/8, 12/8] x target (bounded by the short side), random crop to target. (H, W, 3) -> (target, target, 3)."""
    s_min = min(img.shape[:2])
    if s_min < target:
        raise ValueError(f"image of {img.shape[1]}x{img.shape[0]} is smaller than the target {target}")
    img = _random_crop(img, s_min, rng)
    t_min, t_max = min(s_min, round(9 / 8 * target)), min(s_min, round(12 / 8 * target))
    t = rng.randint(t_min, t_max)
    if t != s_min:
        img = np.asarray(Image.fromarray(img).resize((t, t), Image.Resampling.BOX))  # BOX = area averaging
    return _random_crop(img, target, rng)


def center_resize(img: np.ndarray, target: int) -> np.ndarray:
    """Evaluation view: central square crop, area-resize to target."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top : top + s, left : left + s]
    if s != target:
        img = np.asarray(Image.fromarray(img).resize((target, target), Image.Resampling.BOX))
    return img
