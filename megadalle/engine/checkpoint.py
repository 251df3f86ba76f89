"""Checkpoints: DeepSpeed's engine state (sharded as it trains) plus our own `extra.pt` (EMA, step, resolved
config), written into `<run>/checkpoints/step_NNNNNNNN/`. DeepSpeed writes the `latest` pointer last, and
our file is written before it, atomically, so `latest` only ever names a complete checkpoint."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadalle.config import JobConfig, apply_toml_text, dump_toml
from megadalle.engine.ema import ShardedEMA

EXTRA = "extra.pt"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(engine, root: Path, step: int, ema: ShardedEMA | None, cfg: JobConfig, keep: int) -> Path:
    """Collective: every rank calls it."""
    tag = tag_of(step)
    folder = root / tag
    # the weights for evaluation, encoding and sampling: the EMA, or the live weights when there is none
    weights = ema.full_state_dict() if ema is not None else gathered_state(engine)
    kind = "ema" if ema is not None else "live"
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_atomic({"step": step, "weights": weights, "weights_kind": kind, "config": dump_toml(cfg)}, folder / EXTRA)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    if dist.get_rank() == 0 and keep > 0:
        tags = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def resolve_resume(root: Path, resume: str) -> Path | None:
    """ "" -> None; "latest" -> the tag named by <root>/latest (None if there is none yet); else a folder."""
    if not resume:
        return None
    if resume == "latest":
        latest = root / "latest"
        return root / latest.read_text().strip() if latest.is_file() else None
    path = Path(resume)
    if not (path / EXTRA).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume}: no {EXTRA} there (not a megadalle checkpoint)")
    return path


def load_checkpoint(engine, folder: Path, ema: ShardedEMA | None) -> int:
    """Restore engine state and EMA from `folder`; return the step it was saved at."""
    extra_path = folder / EXTRA
    if not extra_path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} is incomplete: {EXTRA} is missing")
    extra = torch.load(extra_path, map_location="cpu", weights_only=False)
    load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no engine state in {folder}")
    if ema is not None:
        if extra.get("weights_kind") != "ema":
            raise ValueError(f"checkpoint {folder} has no EMA but optim.ema_decay > 0")
        ema.load_full_state_dict(extra["weights"])
    return int(extra["step"])


def gathered_state(engine) -> dict[str, torch.Tensor]:
    """Collective under ZeRO-3: the full fp32 state dict of the live weights, on every rank."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_tensor")):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def load_eval_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], JobConfig]:
    """(state_dict, resolved JobConfig) of a checkpoint folder, its extra.pt, or a checkpoints/ folder (its
    `latest`): the EMA weights where the run kept an EMA, else the live ones. For encoding and sampling."""
    path = Path(path)
    if path.is_dir() and (path / "latest").is_file():  # a run's checkpoints/ folder: follow its pointer
        path = path / (path / "latest").read_text().strip()
    if path.is_dir():
        path = path / EXTRA
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    extra = torch.load(path, map_location="cpu", weights_only=False)
    if not extra.get("weights"):
        raise ValueError(f"{path} holds no weights")
    cfg = JobConfig()
    apply_toml_text(cfg, extra["config"], f"{path} (stored config)")
    return extra["weights"], cfg
