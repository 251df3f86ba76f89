"""Checkpoints written the way megadalle/engine/checkpoint.py's save_checkpoint writes them, less DeepSpeed's engine
state: extra.pt (step, eval weights, resolved config) and the COMPLETE marker. For freshly initialised debug models:
loading and sampling tests without training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from megadalle.config import JobConfig, dump_toml
from megadalle.engine.checkpoint import EXTRA, save_atomic, tag_of, write_marker
from megadalle.models.clip import FLAVORS as CLIP_FLAVORS
from megadalle.models.clip import ContrastiveModel
from megadalle.models.dvae import FLAVORS as DVAE_FLAVORS
from megadalle.models.dvae import DiscreteVAE
from megadalle.models.tokenizer import train_bpe
from megadalle.models.transformer import FLAVORS as PRIOR_FLAVORS
from megadalle.models.transformer import DallePrior

CAPTIONS = ["red heart in twemoji style", "a smiling cat face", "woman mechanic, dark skin tone in openmoji style",
            "blue car on a road", "green tree on a hill"]  # fmt: skip


def tiny_config(stage: str, tokenizer_model: str | Path = "") -> JobConfig:
    """The debug flavors of all three models (8x8 grids of 256 codes, 16 text positions)."""
    cfg = JobConfig()
    cfg.job.stage = stage
    cfg.model.dvae_flavor, cfg.model.prior_flavor, cfg.model.clip_flavor = "debug", "debug", "debug"
    cfg.tokenizer.model_path = str(tokenizer_model)
    cfg.tokenizer.max_len = 16
    return cfg


def write_checkpoint(root: Path, weights: dict[str, torch.Tensor], cfg: JobConfig, step: int = 1) -> Path:
    """`<root>/step_NNNNNNNN/` with extra.pt and its marker; returns root (a run's checkpoints/ folder)."""
    folder = root / tag_of(step)
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"step": step, "weights": weights, "weights_kind": "live", "config": dump_toml(cfg)}
    save_atomic(extra, folder / EXTRA)
    write_marker(folder, step, world_size=1)
    return root


def tiny_model(stage: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if stage == "dvae":
        return DiscreteVAE(DVAE_FLAVORS["debug"])
    if stage == "prior":
        return DallePrior(PRIOR_FLAVORS["debug"])
    return ContrastiveModel(CLIP_FLAVORS["debug"])


def tiny_run(root: Path) -> dict[str, Path]:
    """A BPE model and a checkpoints/ folder for each of dvae, prior and clip, under root."""
    tok = train_bpe(CAPTIONS * 4, root / "tok" / "bpe", vocab_size=60)
    paths: dict[str, Path] = {"tokenizer": Path(tok)}
    for i, stage in enumerate(("dvae", "prior", "clip")):
        weights = {k: v.clone() for k, v in tiny_model(stage, seed=i).state_dict().items()}
        paths[stage] = write_checkpoint(root / stage / "checkpoints", weights, tiny_config(stage, tok))
    return paths
