"""A DeepSpeed checkpoint folder read back into whole tensors, without DeepSpeed or a process group: every
parameter's fp32 master copy and, from ZeRO-1/2/3 optimizer files, its Adam moments and step; the buffers.
tools/convert_checkpoint.py builds on it (export, reshard, verify).

ZeRO-3 layout (what `deepspeed/utils/zero_to_fp32.py` undoes too): each rank's optimizer file holds, per
sub-group, one flat fp32 tensor and flat `exp_avg` / `exp_avg_sq` of the same size; the parameters, in the
order of the model file's `param_shapes`, each take ceil(numel / world) consecutive elements of every rank's
concatenated flats, the last rank's share padded. ZeRO-1/2: each rank holds a contiguous slice of each group's
flat vector of all its parameters (in `param_shapes` order, with alignment padding at the end).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: the message names the folder and what is wrong."""


@dataclass
class FullState:
    """Whole tensors of a checkpoint: name -> fp32 master weight, name -> {moment -> tensor}, the optimizer's step
    per parameter group, which group each parameter is in, the buffers, and the world size that wrote it."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)
    group_of: dict[str, int] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    world: int = 1
    zero_stage: int = 0


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else 0


def _load(path: Path) -> dict:
    """DeepSpeed's own files hold Python objects beside tensors (its config, enums): they need the full
    unpickler. Only files of a checkpoint folder this run or a trusted run wrote may be converted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConversionError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def read_zero_checkpoint(folder: str | Path, with_moments: bool = True) -> FullState:
    """The whole fp32 weights (and moments) of the DeepSpeed checkpoint in `folder` (a step_NNNNNNNN folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"no checkpoint folder {folder}")
    optim = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if not optim:
        model = folder / "mp_rank_00_model_states.pt"
        if not model.is_file():
            raise ConversionError(f"{folder} holds no DeepSpeed model or optimizer states")
        return _read_zero0(folder, model, with_moments)
    first = _load(optim[0])["optimizer_state_dict"]
    stage, world = int(first["zero_stage"]), first["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    ranks = [_rank_of(p) for p in optim]
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise ConversionError(f"{folder}: the optimizer shards of ranks {missing} of {world} are missing "
                              f"(found {[p.name for p in optim]})")  # fmt: skip
    optim = [p for p in optim if _rank_of(p) < world]
    models = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank_of)
    model_file = models[0] if models else folder / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConversionError(f"{folder}: no model states file (zero_pp_rank_0_mp_rank_00_model_states.pt)")
    model = _load(model_file)
    shapes: list[dict[str, torch.Size]] = model["param_shapes"]
    states = [_load(p)["optimizer_state_dict"] for p in optim]
    out = FullState(world=world, zero_stage=stage, buffers=_buffers(model))
    inner = [s.get("optimizer_state_dict", {}) for s in states]
    out.steps = [float(inner[0]["state"][i]["step"]) if i in inner[0].get("state", {}) else 0.0
                 for i in range(len(inner[0].get("param_groups", shapes)))]  # fmt: skip
    if stage == 3:
        _merge_zero3(out, shapes, states, inner, with_moments)
    else:
        _merge_zero12(out, shapes, states, inner, with_moments)
    return out


def _buffers(model: dict) -> dict[str, torch.Tensor]:
    names = set(model.get("buffer_names", []))
    return {k: v.float() if v.is_floating_point() else v for k, v in model.get("module", {}).items() if k in names}


def _merge_zero3(out: FullState, shapes: list[dict], states: list[dict], inner: list[dict], moments: bool) -> None:
    world = out.world
    flats = [torch.cat([g.float().reshape(-1) for g in s["fp32_flat_groups"]]) for s in states]  # per rank
    moment_flats = {}
    if moments and inner[0].get("state"):
        n = len(states[0]["fp32_flat_groups"])
        moment_flats = {m: [torch.cat([inner_r["state"][i][m].float().reshape(-1) for i in range(n)])
                            for inner_r in inner] for m in MOMENTS}  # fmt: skip
    offset = 0
    for group, group_shapes in enumerate(shapes):
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            span = (offset, part, numel, shape)
            out.weights[name] = _whole(flats, *span)
            if moment_flats:
                out.moments[name] = {m: _whole(moment_flats[m], *span) for m in MOMENTS}
            out.group_of[name] = group
            offset += part
    if offset != flats[0].numel():
        raise ConversionError(f"ZeRO-3 shards hold {flats[0].numel()} elements per rank, the parameter shapes "
                              f"account for {offset}")  # fmt: skip


def _whole(per_rank: list[torch.Tensor], offset: int, part: int, numel: int, shape: torch.Size) -> torch.Tensor:
    """One parameter from its ZeRO-3 shares: `part` elements at `offset` of each rank's flat, the padding cut."""
    return torch.cat([t[offset : offset + part] for t in per_rank])[:numel].view(shape).clone()


def _merge_zero12(out: FullState, shapes: list[dict], states: list[dict], inner: list[dict], moments: bool) -> None:
    for group, group_shapes in enumerate(shapes):
        flat = torch.cat([s["single_partition_of_fp32_groups"][group].float() for s in states])
        moment_flat = {}
        if moments and inner[0].get("state"):
            moment_flat = {m: torch.cat([r["state"][group][m].float().reshape(-1) for r in inner]) for m in MOMENTS}
        offset = 0
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            out.weights[name] = flat[offset : offset + numel].view(shape).clone()
            if moment_flat:
                out.moments[name] = {m: moment_flat[m][offset : offset + numel].view(shape).clone() for m in MOMENTS}
            out.group_of[name] = group
            offset += numel


def _read_zero0(folder: Path, model_file: Path, with_moments: bool) -> FullState:
    """ZeRO-0 (plain data parallelism): the module's weights in the model file; the client optimizer's state in
    the same file, keyed by parameter index in `param_shapes` order."""
    model = _load(model_file)
    out = FullState(world=1, zero_stage=0, buffers=_buffers(model))
    module = model["module"]
    shapes = model.get("param_shapes") or [{k: v.shape for k, v in module.items() if k not in out.buffers}]
    names = [name for group in shapes for name in group]
    out.weights = {k: module[k].float().clone() for k in names}
    optim = model.get("optimizer") or {}
    groups = optim.get("param_groups", [])
    index = 0
    for g, group in enumerate(groups):
        for i in group["params"]:
            name = names[index]
            out.group_of[name] = g
            state = optim.get("state", {}).get(i, {})
            if with_moments and all(m in state for m in MOMENTS):
                out.moments[name] = {m: state[m].float().clone() for m in MOMENTS}
            index += 1
        first = optim.get("state", {}).get(group["params"][0], {}) if group["params"] else {}
        out.steps.append(float(first.get("step", 0.0)))
    return out
