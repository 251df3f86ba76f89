"""Checkpoints, written into `<run>/checkpoints/step_NNNNNNNN/`: DeepSpeed's engine state (sharded as it trains)
and the EMA's shards (`ema_shardNNNNN.safetensors`), both by the ranks of the first shard group only (the world,
or node group 0 under PowerSGD: the other node groups hold copies of its partitions, and their ranks read the
files of their partitions' owner, `_routed`); each rank's data position and generators; our own small `extra.pt`
(step, resolved config, the loop's global state). No rank gathers the model: the weights for evaluation,
encoding and sampling (the EMA, else the live fp32 masters in DeepSpeed's files) are read back one tensor at a
time (`open_eval_weights`); checkpoints of older megadalle, with whole weights in extra.pt, still load.

A checkpoint is complete when its `COMPLETE` marker is there and every file the marker lists has the size it
records: rank 0 writes the marker, atomically, after every rank has finished writing, then moves DeepSpeed's
`latest` pointer to the folder (atomically too). Every file of ours (extra.pt, the ranks' files, the marker,
`latest`) is written under a temporary name and renamed; DeepSpeed's own files are vouched for by the sizes in
the marker. Resuming, rotation and `load_eval_weights` go by the markers. Earlier output is never deleted by a
fresh start: it is moved aside."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadalle.config import Checkpoint, ConfigError, JobConfig, apply_toml_text, dump_toml
from megadalle.engine.background_writer import BackgroundWriter
from megadalle.engine.distributed import barrier, is_main, sum_over_ranks, world_size
from megadalle.engine.distributed import rank as global_rank
from megadalle.engine.ema import ShardedEMA
from megadalle.engine.metrics import log
from megadalle.engine.tensor_files import TensorFile, TensorFileError, write_tensors
from megadalle.engine.train_state import TrainState

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


RANK_FILE = "rank{:05d}.pt"
"""Each rank's parts of scope "rank" (engine/train_state.py): {"loader": data position, "rng": generators}."""
SHARD_FILES = {"ema": "ema_shard{:05d}.safetensors", "powersgd": "powersgd_local{}.pt"}
"""The files of the parts of scope "shard_group", by shard (the EMA's written as safetensors by write_ema_shard)."""


def save_checkpoint(
    root: Path, step: int, state: TrainState, cfg: JobConfig, keep: int, copy_in: dict[str, Path] | None = None
) -> Path:
    """Collective: every rank calls it. Writes DeepSpeed's engine state and every part of `state` by its scope:
    the global parts in rank 0's extra.pt (with the step and the resolved config), each shard group part by the
    ranks of the first shard group, each rank's own parts in its rank file. `copy_in`: name in the folder -> a file
    or folder rank 0 copies there before the marker (a reshard's). The marker comes last; rotation (`keep` > 0)
    then removes only complete checkpoints older than the newest `keep` complete ones. (`Checkpointer` is the
    training loop's way in, with the background writer of `checkpoint.async_save`.)"""
    folder = _write_files(root, step, state, cfg, None)
    barrier()  # every rank's files are written
    if is_main():
        _complete(root, folder, step, keep, copy_in)
    barrier()
    return folder


def _write_files(root: Path, step: int, state: TrainState, cfg: JobConfig, writer: BackgroundWriter | None) -> Path:
    """Collective: the folder of `step` prepared (rank 0), every part's state taken (collectives included: PowerSGD
    sums its buffers over the node groups), and every file of this rank written, or with a `writer` copied to host
    memory and queued for its thread."""
    folder = root / tag_of(step)
    parts = state.parts()
    states = {name: part.state_dict() for name, part in parts.items()}  # every rank: some are collectives
    writes = {name: part.scope == "rank" or (part.scope == "global" and is_main()) or
              (part.scope == "shard_group" and part.writes) for name, part in parts.items()}  # fmt: skip
    states = {name: st for name, st in states.items() if writes[name]}
    if writer is not None:  # a snapshot in host memory: training goes on changing the tensors
        writer.staging.start()
        states = writer.staging.copy(states)
    run = writer.submit if writer is not None else (lambda job: job())
    if is_main():
        if folder.exists():  # a crashed save of this step, or a rollback saving it again: replace it
            reason = incomplete_reason(folder)
            (folder / MARKER).unlink(missing_ok=True)  # first, so that it never vouches for half-written files
            shutil.rmtree(folder)
            log.warning(f"replacing {folder} ({reason or 'an earlier complete save of this step'})")
        folder.mkdir(parents=True, exist_ok=True)
        loop = {name: states[name] for name, part in parts.items() if part.scope == "global"}
        extra = {"step": step, "weights_kind": "ema" if state.ema is not None else "live", "config": dump_toml(cfg),
                 "loop": loop, "format": FORMAT}  # fmt: skip
        run(partial(save_atomic, extra, folder / EXTRA))
    barrier()  # the folder exists
    for name, part in parts.items():
        if part.scope == "shard_group" and writes[name]:
            if name == "ema":
                run(partial(write_ema_shard, folder, states[name], part.shapes()))
            else:
                run(partial(save_atomic, states[name], folder / SHARD_FILES[name].format(part.shard)))
    own = {name: st for name, st in states.items() if parts[name].scope == "rank"}
    if own:
        run(partial(save_atomic, own, folder / RANK_FILE.format(global_rank())))
    # DeepSpeed's files through its checkpoint engine: under PowerSGD only node group 0's (the other node groups'
    # partitions are copies of them), staged into host memory and queued where a writer runs them
    with _routed(state.engine, writer):
        state.engine.save_checkpoint(str(root), tag=folder.name, client_state={"step": step}, save_latest=False)
    return folder


def _shard_group(engine: Any) -> int:
    """How many ranks ZeRO-3 partitions the parameters over (the world, or a node group under PowerSGD); 0 at ZeRO
    0-2, where DeepSpeed chooses its writers itself."""
    p = next(engine.module.parameters(), None)
    if engine.zero_optimization_stage() != 3 or p is None or not hasattr(p, "ds_process_group"):
        return 0
    return dist.get_world_size(p.ds_process_group) if dist.is_initialized() else 1


DEEPSPEED_RANK = re.compile(r"zero_pp_rank_(\d+)_")
"""DeepSpeed's per-rank file names under ZeRO-3: `[bf16_]zero_pp_rank_<R>_mp_rank_00_{model,optim}_states.pt`, R
the global rank (DeepSpeed's data-parallel group is the world, also where zero.Init partitions over node groups)."""


@contextmanager
def _routed(engine: Any, writer: BackgroundWriter | None) -> Iterator[None]:
    """DeepSpeed's checkpoint engine replaced, for one save or load, by one that, under ZeRO-3 partitioned over node
    groups (PowerSGD), writes only the first node group's files and reads rank R's from rank R mod node group's
    (its partitions' owner there: the node groups hold identical copies; DeepSpeed alone would write all of them,
    128 times the bytes at the paper's 1,024 GPUs); and with a `writer`, copies each state to host memory and
    queues its save."""
    shard = _shard_group(engine)
    if not shard and writer is None:  # ZeRO 0-2 written synchronously: DeepSpeed as it is
        yield
        return
    direct = engine.checkpoint_engine
    engine.checkpoint_engine = _routing_engine(direct, writer, shard)
    listed = engine._get_all_ckpt_names  # DeepSpeed 0.19.8 finds its model-states file by globbing its own name

    def names(checkpoints_path: str, tag: str) -> list[str]:
        found = listed(checkpoints_path, tag)
        if found or not shard:
            return found
        own = engine._get_ckpt_name(checkpoints_path, tag, mp_placeholder="*")
        return sorted(glob.glob(_owner(own, shard)[0]))

    engine._get_all_ckpt_names = names
    try:
        yield
    finally:
        engine.checkpoint_engine = direct
        del engine._get_all_ckpt_names  # the class's method again


def _complete(root: Path, folder: Path, step: int, keep: int, copy_in: dict[str, Path] | None = None) -> None:
    """Rank 0, once every rank's files are written: carried-over files, the marker, DeepSpeed's `latest`, rotation."""
    for name, source in (copy_in or {}).items():  # files or folders carried over (a reshard's)
        dest = folder / name
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    write_marker(folder, step, world_size())
    latest = root / "latest"  # DeepSpeed's pointer (its tools read it), moved only once the folder is complete
    (root / "latest.tmp").write_text(folder.name)
    os.replace(root / "latest.tmp", latest)
    if keep > 0:
        for old in complete_folders(root)[:-keep]:
            shutil.rmtree(old)


def _owner(path: str, shard: int) -> tuple[str, bool]:
    """(the DeepSpeed file holding `path`'s content, whether `path` is that file): rank R's is rank R mod `shard`'s."""
    m = DEEPSPEED_RANK.search(os.path.basename(path))
    if not shard or m is None or int(m.group(1)) < shard:
        return path, True
    name = DEEPSPEED_RANK.sub(f"zero_pp_rank_{int(m.group(1)) % shard}_", os.path.basename(path), count=1)
    return os.path.join(os.path.dirname(path), name), False


def _routing_engine(direct: Any, writer: BackgroundWriter | None, shard: int) -> Any:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    def owner(path: str) -> tuple[str, bool]:
        return _owner(path, shard)

    class Routing(CheckpointEngine):
        def create(self, info: Any) -> None:
            direct.create(info)

        def save(self, state_dict: Any, path: str) -> None:
            if not owner(path)[1]:  # a copy: its owner in node group 0 writes it
                return
            if writer is None:
                direct.save(state_dict, path)
            else:
                writer.submit(partial(direct.save, writer.staging.copy(state_dict), path))

        def load(self, path: str, map_location: Any = None) -> Any:
            return direct.load(owner(path)[0], map_location)

        def is_data_parallel_writer(self, dp_rank: int) -> bool:
            return direct.is_data_parallel_writer(dp_rank)

        def commit(self, info: Any) -> bool:
            return True if writer is not None else direct.commit(info)  # async: the marker is the commit

    return Routing()


WRITTEN = "__checkpoint_written__"
FAILED = "__checkpoint_failed__"


class Checkpointer:
    """The training loop's one save call (STYLE rule 16). `save(step, state)` writes a checkpoint of every part of
    `state`: synchronously, or with `checkpoint.async_save` staged into host memory and written by a background
    thread while training goes on. The loop sums `flags()` over the ranks with each update's statistics and hands
    the sums to `observe`: once every rank's writer is done, rank 0 completes the checkpoint (marker, `latest`,
    rotation). A failed write is a CheckpointError on every rank at the next update."""

    def __init__(self, root: Path, cfg: JobConfig) -> None:
        self.root, self.cfg, self.keep = root, cfg, cfg.checkpoint.keep
        self.writer = BackgroundWriter() if cfg.checkpoint.async_save else None
        self.pending: tuple[Path, int] | None = None
        self.stall_s = 0.0
        """Seconds the last `save` held the loop."""

    def save(self, step: int, state: TrainState, final: bool = False) -> Path:
        """Collective. `final`: the run stops after it, so it is complete when this returns."""
        t0 = time.time()
        self.wait()
        if self.writer is None or final:
            folder = save_checkpoint(self.root, step, state, self.cfg, self.keep)
        else:
            folder = _write_files(self.root, step, state, self.cfg, self.writer)
            self.pending = (folder, step)
        self.stall_s = time.time() - t0
        return folder

    def flags(self) -> dict[str, float]:
        if self.writer is None:
            return {}
        return {WRITTEN: float(self.pending is not None and self.writer.idle()),
                FAILED: float(self.writer.error is not None)}  # fmt: skip

    def observe(self, summed: dict[str, float]) -> None:
        """The update's summed statistics: the flags are taken out of them."""
        written, failed = summed.pop(WRITTEN, 0.0), summed.pop(FAILED, 0.0)
        if failed:
            self._failed(int(failed))
        if self.pending is not None and written == world_size():
            self._complete_pending()

    def wait(self) -> None:
        """Collective: the pending checkpoint written by every rank and completed."""
        if self.pending is None:
            return
        self.writer.wait()
        failed = sum_over_ranks({"failed": float(self.writer.error is not None)})["failed"]
        if failed:
            self._failed(int(failed))
        self._complete_pending()
        barrier()

    def _complete_pending(self) -> None:
        folder, step = self.pending
        self.pending = None
        if is_main():
            _complete(self.root, folder, step, self.keep)

    def _failed(self, ranks: int) -> None:
        folder = self.pending[0] if self.pending else self.root
        e = self.writer.error
        here = f"here: {type(e).__name__}: {e}" if e is not None else "not here"
        raise CheckpointError(f"writing the checkpoint {folder} failed on {ranks} rank(s) ({here}); it stays "
                              "incomplete: the previous complete checkpoint is the one to resume")  # fmt: skip


def load_checkpoint(folder: Path, state: TrainState) -> int:
    """Collective: restore DeepSpeed's engine and every part of `state` from `folder`; returns the step it was
    saved at. A failure of the engine, extra.pt or the EMA, on any rank, is a CheckpointError naming the folder on
    every rank; a part the checkpoint lacks (an older megadalle's) starts afresh with a warning."""
    try:
        extra = torch.load(folder / EXTRA, map_location="cpu", weights_only=True)
        error = None
    except Exception as e:  # truncated, corrupt or missing: name the file, not the unpickler's internals
        error = f"cannot read {folder / EXTRA}: {type(e).__name__}: {e}"
    _agree(error, folder)
    try:
        with _routed(state.engine, None):
            load_path, _ = state.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if load_path is None:
            error = f"DeepSpeed found no engine state in {folder}"
    except Exception as e:
        error = f"cannot load the engine state in {folder}: {type(e).__name__}: {e}"
    _agree(error, folder)
    loop = dict(extra.get("loop", {}))
    try:
        own, error = _rank_states(folder), None
    except Exception as e:
        own, error = {}, f"cannot read this rank's file in {folder}: {type(e).__name__}: {e}"
    _agree(error, folder)
    for name, part in state.parts().items():  # every rank the same parts, each agreed: no rank left waiting
        error = None
        try:
            if part.scope == "shard_group" and name == "ema":
                if extra.get("weights_kind") != "ema":
                    error = f"checkpoint {folder} has no EMA but optim.ema_decay > 0"
                else:
                    load_ema(folder, extra, part)
            else:
                if part.scope == "global":
                    found = loop.get(name)
                elif part.scope == "rank":
                    found = own.get(name)
                else:
                    found = _shard_state(folder, name, part, loop)
                if found is None:
                    log.warning(f"{folder} holds no {name} state for rank {global_rank()} of {world_size()}: it "
                                "starts afresh")  # fmt: skip
                elif part.load_state_dict(found) is False:
                    log.warning(f"{folder} holds {name} state of an older megadalle that does not map to this one: "
                                "it starts afresh")  # fmt: skip
        except Exception as e:  # a cut file, a shape that does not fit: name the part and the folder
            error = f"cannot load the {name} state of {folder}: {type(e).__name__}: {e}"
        _agree(error, folder)
    return int(extra["step"])


def carried_files(folder: Path) -> dict[str, Path]:
    """What a checkpoint rewritten for another world size (engine/convert.py's reshard) carries over from `folder`,
    by its name there: the ranks' files into `from_world_<N>/` (a resume at N ranks takes them back), earlier such
    folders, and PowerSGD's files (summed over the node groups)."""
    world = int(json.loads((folder / MARKER).read_text())["world_size"])
    out = {f"from_world_{world}/{p.name}": p for p in sorted(folder.glob(RANK_FILE.replace("{:05d}", "*")))}
    powersgd = SHARD_FILES["powersgd"].split("{")[0]
    for p in sorted(folder.iterdir()):
        if (p.is_dir() and p.name.startswith("from_world_")) or p.name.startswith(powersgd):
            out[p.name] = p
    return out


def write_weights_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], cfg: JobConfig, source: str) -> Path:
    """A complete step-0 checkpoint of whole weights and no training state (an import: OpenAI's dVAE), in extra.pt
    as older megadalle wrote them; `open_eval_weights` and `load_trained` read it."""
    folder = run_dir / "checkpoints" / tag_of(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_atomic({"step": 0, "weights": weights, "weights_kind": "live", "config": dump_toml(cfg), "loop": {},
                 "source": source}, folder / EXTRA)  # fmt: skip
    write_marker(folder, 0, 1)
    return folder


def is_step_folder(path: Path) -> bool:
    """Whether `path` is one checkpoint (a step folder), not a run's checkpoints/ folder."""
    return (path / EXTRA).exists()


def _rank_states(folder: Path) -> dict[str, Any]:
    """This rank's own parts: its rank file, or the one a reshard kept in from_world_<N>/ for a resume at N ranks,
    or an older megadalle's data position alone (loader_rank<R>.pt)."""
    name = RANK_FILE.format(global_rank())
    for path in (folder / name, folder / f"from_world_{world_size()}" / name):  # see carried_files
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    legacy = folder / f"loader_rank{global_rank()}.pt"
    if legacy.is_file():
        return {"loader": torch.load(legacy, map_location="cpu", weights_only=True)}
    return {}


def _shard_state(folder: Path, name: str, part: Any, loop: dict) -> dict | None:
    """A shard group part's file for this rank's shard, where every rank finds its own (else None on all ranks)."""
    path = folder / SHARD_FILES[name].format(part.shard)
    if sum_over_ranks({"missing": float(not path.is_file())})["missing"]:
        return None
    found = torch.load(path, map_location="cpu", weights_only=True)
    if name == "powersgd" and "buffers" not in found:  # an older megadalle: the buffers alone, the count in loop
        found = {"updates": loop.get("powersgd_updates", 0), "buffers": found}
    return found


FORMAT = 2
"""extra.pt's layout: 2 = the EMA in shard files, no weights in extra.pt; absent = whole weights in extra.pt."""
EMA_FORMAT = "megadalle-ema-shard-1"


def write_ema_shard(folder: Path, state: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Path:
    """An EMA shard (`ShardedEMA.state_dict()`): each parameter's flat fp32 partition, the whole `shapes` and the
    layout in the metadata."""
    meta = {"format": EMA_FORMAT, "shard": state["shard"], "shards": state["shards"], "updates": state["updates"],
            "shapes": json.dumps(shapes)}  # fmt: skip
    path = folder / SHARD_FILES["ema"].format(state["shard"])
    write_tensors(path, state["tensors"], meta)
    return path


class EMAShards:
    """The EMA shard files of a checkpoint folder; `whole(name)` cuts one parameter from its shards."""

    def __init__(self, folder: Path) -> None:
        paths = sorted(folder.glob("ema_shard*.safetensors"))
        if not paths:
            raise TensorFileError(f"{folder} holds no EMA shard files ({SHARD_FILES['ema'].format(0)}, ...)")
        self.files = [TensorFile(p) for p in paths]
        meta = self.files[0].metadata
        if meta.get("format") != EMA_FORMAT:
            raise TensorFileError(f"{paths[0]}: format {meta.get('format')!r}, expected {EMA_FORMAT!r}")
        self.shards = int(meta["shards"])
        found = [int(f.metadata.get("shard", -1)) for f in self.files]
        if found != list(range(self.shards)) or any(int(f.metadata["shards"]) != self.shards for f in self.files):
            raise TensorFileError(f"{folder}: EMA shards {found} found, 0..{self.shards - 1} expected")
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
        self.updates = int(meta.get("updates", 0))

    def whole(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        parts = [f.read(name) for f in self.files]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        return flat[: math.prod(shape)].view(shape)


def load_ema(folder: Path, extra: dict, ema: ShardedEMA) -> None:
    """This rank's EMA from `folder`: its own shard file read straight into the EMA's tensors where the layout is
    the same; otherwise each parameter whole, one at a time, and this rank's slice kept (a checkpoint of another
    shard layout, or an old one with whole weights in extra.pt)."""
    if "weights" in extra:  # before FORMAT 2
        missing = sorted(set(ema.shapes()) - set(extra["weights"]))
        if missing:
            raise KeyError(f"its EMA lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, whole in extra["weights"].items():
            ema.load_whole(name, whole)
        return
    shards = EMAShards(folder)
    missing = sorted(set(ema.shapes()) - set(shards.shapes))
    if missing:
        raise KeyError(f"its EMA lacks {len(missing)} parameters, e.g. {missing[:3]}")
    if shards.shards == ema.shards:
        own = shards.files[ema.shard]
        for s, (name, _) in zip(ema.shadow, ema.named):
            if s.device.type == "cpu":
                own.read(name, into=s)
            else:  # through host memory, one tensor at a time
                s.copy_(own.read(name).view(s.shape))
    else:
        for name in ema.shapes():
            ema.load_whole(name, shards.whole(name))
    ema.updates = shards.updates


def _agree(error: str | None, folder: Path) -> None:
    """Raise on every rank when any rank failed: the others must not wait in a collective for it."""
    if dist.is_available() and dist.is_initialized():
        failed = sum_over_ranks({"failed": float(error is not None)})["failed"]
        if failed and error is None:
            error = f"another rank could not load the checkpoint {folder}"
    if error is not None:
        raise CheckpointError(error)


@dataclass
class EvalWeights:
    """The weights a checkpoint or an export offers for evaluation, encoding and sampling, read one tensor at a
    time: `read(name)` gives the whole tensor (fp32 where floating), `shapes` every name's shape, in order."""

    cfg: JobConfig
    kind: str
    """"ema" or "live"."""
    step: int
    source: Path
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    updates: int = 0
    """The EMA's update count where the shards record it."""

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.shapes:
            yield name, self.read(name)


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def open_eval_weights(path: str | Path, kind: str = "auto") -> EvalWeights:
    """The weights of a checkpoint folder, its extra.pt, a run's checkpoints/ folder (its newest complete
    checkpoint) or an exported `.safetensors` file. `kind`: "ema", "live", or "auto" (the EMA where the run kept
    one, else the live fp32 masters read from DeepSpeed's files)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    if path.is_dir() and step_folders(path):  # a run's checkpoints/ folder
        newest = find_resume(path, "auto")
        if newest is None:
            raise FileNotFoundError(f"no complete checkpoint under {path}")
        path = newest
    folder = path if path.is_dir() else path.parent
    if not (folder / EXTRA).is_file():
        raise FileNotFoundError(f"no checkpoint file {folder / EXTRA}")
    extra = torch.load(folder / EXTRA, map_location="cpu", weights_only=True)
    cfg = JobConfig()
    apply_toml_text(cfg, extra["config"], f"{folder / EXTRA} (stored config)")
    stored = extra.get("weights_kind", "live")
    kind = stored if kind == "auto" else kind
    if kind not in ("ema", "live"):
        raise ValueError(f"weights kind {kind!r}: expected ema, live or auto")
    step = int(extra["step"])
    if "weights" in extra and kind == stored:  # before FORMAT 2: whole weights in extra.pt
        if not extra["weights"]:
            raise ValueError(f"{folder / EXTRA} holds no weights")
        weights = extra["weights"]
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        return EvalWeights(cfg, kind, step, folder, shapes, lambda name: _as_fp32(weights[name]))
    if kind == "ema":
        if stored != "ema":
            raise ValueError(f"{folder} holds no EMA weights (the run had optim.ema_decay = 0): use the live ones")
        shards = EMAShards(folder)
        return EvalWeights(cfg, kind, step, folder, shards.shapes, shards.whole, shards.updates)
    from megadalle.engine.consolidate import open_live

    shapes, read = open_live(folder)
    return EvalWeights(cfg, kind, step, folder, shapes, lambda name: _as_fp32(read(name)))


def load_eval_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], JobConfig]:
    """(state_dict, resolved JobConfig) of `open_eval_weights(path)`, every tensor in memory at once: for small
    models and tests; a model is better loaded one tensor at a time (stages/load.py)."""
    w = open_eval_weights(path)
    return dict(w.items()), w.cfg


SAFETENSORS_FORMAT = "megadalle-weights-1"


def _open_safetensors(path: Path) -> EvalWeights:
    """An exported `.safetensors` file (tools/convert_checkpoint.py export), its JobConfig from the metadata."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        f = TensorFile(path)
    except TensorFileError as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    meta = f.metadata
    if meta.get("format") != SAFETENSORS_FORMAT or "config" not in meta:
        raise ValueError(f"{path}: no megadalle metadata (format {meta.get('format')!r}, expected "
                         f"{SAFETENSORS_FORMAT!r}); export it with tools/convert_checkpoint.py")  # fmt: skip
    cfg = JobConfig()
    apply_toml_text(cfg, meta["config"], f"{path} (stored config)")
    shapes = {name: f.spec(name)[1] for name in f.keys()}
    step = int(meta.get("step", 0))
    return EvalWeights(cfg, meta.get("weights", "ema"), step, path, shapes, lambda name: _as_fp32(f.read(name)))
