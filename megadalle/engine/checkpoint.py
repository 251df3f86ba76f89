"""Checkpoints: DeepSpeed's engine state (sharded as it trains) plus our own `extra.pt` (EMA, step, resolved
config), written into `<run>/checkpoints/step_NNNNNNNN/`. A checkpoint is complete when its `COMPLETE` marker
is there and every file the marker lists has the size it records: rank 0 writes the marker, atomically, after
every rank has finished writing, then moves DeepSpeed's `latest` pointer to the folder (atomically too). Every
file of ours (extra.pt, the ranks' files, the marker, `latest`) is written under a temporary name and renamed;
DeepSpeed's own files are vouched for by the sizes in the marker. Resuming, rotation and `load_eval_weights` go
by the markers. Earlier output is never deleted by a fresh start: it is moved aside."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadalle.config import Checkpoint, ConfigError, JobConfig, apply_toml_text, dump_toml
from megadalle.engine.distributed import barrier, is_main, sum_over_ranks, world_size
from megadalle.engine.ema import ShardedEMA
from megadalle.engine.metrics import log

EXTRA = "extra.pt"
MARKER = "COMPLETE"
TAG = re.compile(r"step_(\d{8})")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from, or a run folder that a fresh start would clobber; the message
    names the folder (train.py reports it and exits with 2, like a config error)."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def step_folders(root: Path) -> list[Path]:
    """The `step_NNNNNNNN` folders under `root`, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and TAG.fullmatch(p.name))


def write_marker(folder: Path, step: int, world_size: int) -> None:
    """Rank 0, after every rank has written its files: record them with their sizes, atomically."""
    files = {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MARKER and not f.name.endswith(".tmp")
    }
    marker = {"step": step, "world_size": world_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, folder / MARKER)


def incomplete_reason(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint, else why not (for the operator)."""
    path = folder / MARKER
    if not path.is_file():
        return f"missing {MARKER} marker"
    try:
        marker = json.loads(path.read_text())
        files = dict(marker["files"])
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} marker ({type(e).__name__}: {e})"
    m = TAG.fullmatch(folder.name)
    if m and marker.get("step") != int(m.group(1)):
        return f"{MARKER} marker says step {marker.get('step')}"
    if EXTRA not in files:
        return f"{MARKER} marker lists no {EXTRA}"
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, marker says {size}"
    return None


def complete_folders(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    return [f for f in step_folders(root) if incomplete_reason(f) is None]


def find_resume(root: Path, resume: str, overwrite: bool = False) -> Path | None:
    """The checkpoint folder to resume from, None for a fresh start.

    resume "auto" (or its alias "latest"): the newest complete checkpoint under `root`; newer incomplete or
    corrupt ones are skipped with a warning naming them and the reason. "none": a fresh start, refused while
    `root` holds a complete checkpoint unless `overwrite`. Anything else: that folder, which must be complete."""
    if resume in ("auto", "latest"):
        for folder in reversed(step_folders(root)):
            reason = incomplete_reason(folder)
            if reason is None:
                return folder
            if _legacy_complete(root, folder):
                log.warning(
                    f"resuming from {folder}, written before completeness markers: DeepSpeed's `latest` names it"
                )
                return folder
            log.warning(f"skipping checkpoint {folder}: {reason}")
        return None
    if resume == "none":
        done = complete_folders(root)
        if done and not overwrite:
            last = int(TAG.fullmatch(done[-1].name).group(1))
            raise CheckpointError(
                f"checkpoint.resume=none, but {root} already holds checkpoints up to step {last}: "
                "resume them (checkpoint.resume=auto, the default), pass another job.name, or pass "
                "--checkpoint.overwrite=true to move them aside and start over"
            )
        return None
    if not resume:
        raise CheckpointError("checkpoint.resume is empty: expected auto, none, latest or a checkpoint folder")
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume}: no such folder")
    reason = incomplete_reason(folder)
    if reason is not None:
        raise CheckpointError(f"checkpoint.resume={resume} is not a complete checkpoint: {reason}")
    return folder


def _legacy_complete(root: Path, folder: Path) -> bool:
    """A checkpoint written before the COMPLETE markers existed: the old save wrote extra.pt first and DeepSpeed's
    `latest` pointer last, so a folder that `latest` names and that holds extra.pt was complete."""
    latest = root / "latest"
    return (
        not (folder / MARKER).exists()
        and (folder / EXTRA).is_file()
        and latest.is_file()
        and latest.read_text().strip() == folder.name
    )


def older_complete(root: Path, folder: Path) -> Path | None:
    """The newest complete checkpoint of `root` older than `folder` (the fallback when `folder` cannot be loaded)."""
    older = [f for f in complete_folders(root) if f.name < folder.name]
    return older[-1] if older else None


def _aside(path: Path, suffix: str = "") -> Path:
    """A free name next to `path` for moving it aside: `<stem>.old-<time>[-n]<suffix>`."""
    stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    base = f"{stem}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, n = path.with_name(base + suffix), 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{base}-{n}{suffix}")
    return dest


def prepare_resume(root: Path, ckpt: Checkpoint, outputs: list[Path]) -> Path | None:
    """Collective (every rank calls it; works without torch.distributed too): rank 0 decides with
    `find_resume(root, ckpt.resume, ckpt.overwrite)` and prepares the run folder; every rank gets the same
    folder or the same CheckpointError.

    A fresh start moves earlier output aside, never deletes it: `root` to `<root>.old-<time>` and each existing
    file or folder of `outputs` (the run's metrics.jsonl, config.toml, ds_config.json, images/) to
    `<stem>.old-<time><suffix>`. Resuming from a folder of `root` older
    than its newest checkpoints (a rollback) moves the newer ones into `<root>.old-<time>/`, so that a later
    `auto` resumes this history, not the abandoned one."""
    distributed = dist.is_available() and dist.is_initialized()
    outcome: list[Any] = [None]
    failure: Exception | None = None
    if is_main():
        try:
            folder = find_resume(root, ckpt.resume, ckpt.overwrite)
            if folder is None:
                if root.is_dir() and any(root.iterdir()):
                    dest = _aside(root)
                    os.replace(root, dest)
                    log.warning(f"fresh start: moved the earlier checkpoints {root} aside to {dest}")
                for out in outputs:
                    if out.is_dir() or (out.is_file() and out.stat().st_size > 0):
                        dest = _aside(out, out.suffix)
                        os.replace(out, dest)
                        log.warning(f"fresh start: moved the earlier {out} aside to {dest}")
            elif folder.resolve().parent == root.resolve():
                # incomplete newer ones stay: the save of their step replaces them
                newer = [f for f in complete_folders(root) if f.name > folder.name]
                if newer:
                    dest = _aside(root)
                    dest.mkdir()
                    for f in newer:
                        os.replace(f, dest / f.name)
                    log.warning(f"resuming from {folder.name}: moved the newer {[f.name for f in newer]} to {dest}")
            outcome = [("ok", None if folder is None else str(folder))]
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            failure = e
            outcome = [("error", str(e) if isinstance(e, CheckpointError) else f"rank 0: {type(e).__name__}: {e}")]
    if distributed:
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    kind, value = outcome[0]
    if kind == "error":
        raise CheckpointError(value)
    return None if value is None else Path(value)


def save_checkpoint(
    engine,
    root: Path,
    step: int,
    ema: ShardedEMA | None,
    cfg: JobConfig,
    keep: int,
    loop: dict | None = None,
    rank_files: dict[str, Any] | None = None,
    copy_in: dict[str, Path] | None = None,
) -> Path:
    """Collective: every rank calls it. `loop`: the training loop's own state (plain values: the lr schedule's),
    stored in extra.pt. `rank_files`: file name -> object this rank writes into the folder (PowerSGD's summed
    error buffers, one file per local ordinal). `copy_in`: name in the folder -> a file or folder rank 0 copies
    there before the marker. The marker comes last; rotation (`keep` > 0) then removes only
    complete checkpoints older than the newest `keep` complete ones."""
    tag = tag_of(step)
    folder = root / tag
    # the weights for evaluation, encoding and sampling: the EMA, or the live weights when there is none
    weights = ema.full_state_dict() if ema is not None else gathered_state(engine)
    kind = "ema" if ema is not None else "live"
    if is_main():
        if folder.exists():  # a crashed save of this step, or a rollback saving it again: replace it
            reason = incomplete_reason(folder)
            (folder / MARKER).unlink(missing_ok=True)  # first, so that it never vouches for half-written files
            shutil.rmtree(folder)
            log.warning(f"replacing {folder} ({reason or 'an earlier complete save of this step'})")
        folder.mkdir(parents=True, exist_ok=True)
        extra = {"step": step, "weights": weights, "weights_kind": kind, "config": dump_toml(cfg), "loop": loop or {}}
        save_atomic(extra, folder / EXTRA)
    barrier()
    for name, obj in (rank_files or {}).items():
        save_atomic(obj, folder / name)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    barrier()  # every rank's files are written
    if is_main():
        for name, source in (copy_in or {}).items():  # files or folders carried over (a reshard's)
            dest = folder / name
            if source.is_dir():
                shutil.copytree(source, dest, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)
        write_marker(folder, step, world_size())
        latest = root / "latest"  # DeepSpeed's pointer (its tools read it), moved only once the folder is complete
        (root / "latest.tmp").write_text(tag)
        os.replace(root / "latest.tmp", latest)
        if keep > 0:
            for old in complete_folders(root)[:-keep]:
                shutil.rmtree(old)
    barrier()
    return folder


def load_checkpoint(engine, folder: Path, ema: ShardedEMA | None) -> tuple[int, dict]:
    """Collective: restore engine state and EMA from `folder`; return the step it was saved at and the training
    loop's state saved with it. Any failure, on any rank, is a CheckpointError naming the folder on every rank."""
    try:
        extra = torch.load(folder / EXTRA, map_location="cpu", weights_only=True)
        error = None
    except Exception as e:  # truncated, corrupt or missing: name the file, not the unpickler's internals
        error = f"cannot read {folder / EXTRA}: {type(e).__name__}: {e}"
    _agree(error, folder)
    try:
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if load_path is None:
            error = f"DeepSpeed found no engine state in {folder}"
    except Exception as e:
        error = f"cannot load the engine state in {folder}: {type(e).__name__}: {e}"
    _agree(error, folder)
    if ema is not None:
        if extra.get("weights_kind") != "ema":
            raise CheckpointError(f"checkpoint {folder} has no EMA but optim.ema_decay > 0")
        ema.load_full_state_dict(extra["weights"])
    return int(extra["step"]), dict(extra.get("loop", {}))


def _agree(error: str | None, folder: Path) -> None:
    """Raise on every rank when any rank failed: the others must not wait in a collective for it."""
    if dist.is_available() and dist.is_initialized():
        failed = sum_over_ranks({"failed": float(error is not None)})["failed"]
        if failed and error is None:
            error = f"another rank could not load the checkpoint {folder}"
    if error is not None:
        raise CheckpointError(error)


def gathered_state(engine) -> dict[str, torch.Tensor]:
    """Collective under ZeRO-3: the full fp32 state dict of the live weights, on every rank."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_tensor")):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def load_eval_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], JobConfig]:
    """(state_dict, resolved JobConfig) of a checkpoint folder, its extra.pt, or a checkpoints/ folder (its
    newest complete checkpoint): the EMA weights where the run kept an EMA, else the live ones; or of a
    consolidated `.safetensors` file (tools/convert_checkpoint.py export). For encoding and sampling."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors_weights(path)
    if path.is_dir() and step_folders(path):  # a run's checkpoints/ folder
        newest = find_resume(path, "auto")
        if newest is None:
            raise FileNotFoundError(f"no complete checkpoint under {path}")
        path = newest
    if path.is_dir():
        path = path / EXTRA
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    extra = torch.load(path, map_location="cpu", weights_only=True)
    if not extra.get("weights"):
        raise ValueError(f"{path} holds no weights")
    cfg = JobConfig()
    apply_toml_text(cfg, extra["config"], f"{path} (stored config)")
    return extra["weights"], cfg


SAFETENSORS_FORMAT = "megadalle-weights-1"


def load_safetensors_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], JobConfig]:
    """(state_dict upcast to fp32, the JobConfig stored in its metadata) of an exported `.safetensors` file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    if meta.get("format") != SAFETENSORS_FORMAT or "config" not in meta:
        raise ValueError(f"{path}: no megadalle metadata (format {meta.get('format')!r}, expected "
                         f"{SAFETENSORS_FORMAT!r}); export it with tools/convert_checkpoint.py")  # fmt: skip
    cfg = JobConfig()
    apply_toml_text(cfg, meta["config"], f"{path} (stored config)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, cfg
