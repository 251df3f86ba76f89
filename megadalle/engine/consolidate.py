"""A DeepSpeed checkpoint folder read back into whole tensors, without a process group: every parameter's fp32
master copy and, from ZeRO-3 optimizer files, its Adam moments and steps; the buffers; ZeRO-0's module weights.
tools/convert_checkpoint.py builds on it (export, reshard, verify). DeepSpeed's files are read by torch's
weights_only unpickler with only the DeepSpeed classes they hold allowed.

ZeRO-3 layout (what `deepspeed/utils/zero_to_fp32.py` undoes too): each rank's optimizer file holds, per
sub-group, one flat fp32 tensor and flat `exp_avg` / `exp_avg_sq` of the same size; the parameters, in the
order of the model file's `param_shapes`, each take ceil(numel / world) consecutive elements of every rank's
concatenated flats, the last rank's share padded. With PowerSGD the parameters are split over a node group, and
the other node groups hold copies: the split is solved from the flat size.
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
    loss_scaler: dict = field(default_factory=dict)
    """DeepSpeed's own fp16 loss scaler state (train.grad_scaler = global), from rank 0's optimizer file."""


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else 0


def _allowed_globals() -> list:
    """The classes DeepSpeed 0.19.8 pickles into its checkpoint files beside tensors and plain values."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _load(path: Path) -> dict:
    """A DeepSpeed checkpoint file through torch's weights_only unpickler, with only the DeepSpeed classes those
    files hold allowed (memory-mapped: a rank reads only the pages it touches)."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConversionError(f"cannot read {path}: {first}") from None


def zero_stage_of(folder: str | Path) -> int:
    """The ZeRO stage a checkpoint folder was written at (0 without optimizer shards), from one file."""
    optim = sorted(Path(folder).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if not optim:
        return 0
    return _stage(_load(optim[0])["optimizer_state_dict"], optim[0])


def _stage(state: dict, path: Path) -> int:
    if "zero_stage" not in state:
        raise ConversionError(f"{path}: no zero_stage (DeepSpeed's bf16 optimizer without ZeRO is not supported)")
    return int(state["zero_stage"])


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
        return _read_zero0(model)
    first = _load(optim[0])["optimizer_state_dict"]  # read once: the stage, the flat sizes, rank 0's state
    stage = _stage(first, optim[0])
    if stage in (1, 2):
        raise ConversionError(f"{folder} was written at ZeRO stage {stage}: its gathered weights are in extra.pt "
                              "(export --weights ema, or live where the run kept no EMA); shards are read for "
                              "ZeRO-0 and ZeRO-3")  # fmt: skip
    models = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank_of)
    if not models:
        raise ConversionError(f"{folder}: no model states file (zero_pp_rank_0_mp_rank_00_model_states.pt)")
    model = _load(models[0])
    shapes: list[dict[str, torch.Size]] = model["param_shapes"]
    numels = [math.prod(shape) for group in shapes for shape in group.values()]
    per_rank = sum(g.numel() for g in first["fp32_flat_groups"])
    # the ranks a parameter is split over: the world, or with PowerSGD a node group (zero.Init's data-parallel
    # group), whose shards the other node groups replicate
    count = first["partition_count"]
    most = max(max(count) if isinstance(count, list) else int(count), len(optim))
    split = next((n for n in range(1, most + 1) if sum(math.ceil(k / n) for k in numels) == per_rank), None)
    if split is None:
        raise ConversionError(f"{folder}: {per_rank} elements per rank fit no split of the parameter shapes over "
                              f"1..{most} ranks")  # fmt: skip
    ranks = [_rank_of(p) for p in optim]
    missing = sorted(set(range(split)) - set(ranks))
    if missing:
        raise ConversionError(f"{folder}: the optimizer shards of ranks {missing} of {split} are missing "
                              f"(found {[p.name for p in optim]})")  # fmt: skip
    states = [first] + [_load(p)["optimizer_state_dict"] for p in optim if 0 < _rank_of(p) < split]
    inner = [st.get("optimizer_state_dict", {}) for st in states]
    out = FullState(world=split, zero_stage=3, buffers=_buffers(model))
    groups = inner[0].get("param_groups", [])
    out.steps = [float(inner[0]["state"][g["params"][0]]["step"]) if g.get("params") and g["params"][0] in
                 inner[0].get("state", {}) else 0.0 for g in groups]  # fmt: skip
    out.loss_scaler = {k: first[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in first}
    _merge_zero3(out, shapes, states, inner, with_moments)
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


def _read_zero0(model_file: Path) -> FullState:
    """ZeRO-0 (plain data parallelism): the module's weights as saved (the weights only)."""
    model = _load(model_file)
    out = FullState(world=1, zero_stage=0, buffers=_buffers(model))
    out.weights = {k: v.float().clone() for k, v in model["module"].items() if k not in out.buffers}
    return out
