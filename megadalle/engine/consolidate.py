"""A DeepSpeed checkpoint folder read back into whole tensors, without a process group: every parameter's fp32
master copy and, from ZeRO-3 optimizer files, its Adam moments and steps; the buffers; ZeRO-0's module weights;
one parameter at a time (`ZeroShards`, `open_live`) or all at once (`read_zero_checkpoint`, for --verify).
engine/convert.py builds on it (export, reshard, verify). DeepSpeed's files are read by torch's
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
from collections.abc import Callable
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


class ZeroShards:
    """A ZeRO-3 checkpoint's parameters readable one at a time: the ranks' optimizer files are memory-mapped and
    each whole tensor is cut from its shares when asked for (`weight`, `moments`), so a consolidation holds one
    tensor, not the model. The pages a mapping has read stay resident while it lives: the files are mapped again
    (and the old mappings dropped) after every `MAPPED_BUDGET` bytes read. `names` lists the parameters in the
    model file's order, `shapes` their shapes."""

    MAPPED_BUDGET = 32 * 2**20

    def __init__(self, folder: Path, first: dict, optim: list[Path]) -> None:
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
        self.paths = [p for p in optim if _rank_of(p) < split]
        self.world, self.model = split, {k: v for k, v in model.items() if k in ("buffer_names", "module")}
        self.loss_scaler = {k: first[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in first}
        """DeepSpeed's own fp16 loss scaler state (train.grad_scaler = global)."""
        inner = first.get("optimizer_state_dict", {})
        groups, state = inner.get("param_groups", []), inner.get("state", {})
        self.steps = [float(state[g["params"][0]]["step"]) if g.get("params") and g["params"][0] in state else 0.0
                      for g in groups]  # fmt: skip
        """The optimizer's step per parameter group, from rank 0's optimizer state."""
        self.has_moments = bool(state)
        self.spans: dict[str, tuple[int, int, int, torch.Size]] = {}
        self.group_of: dict[str, int] = {}
        offset = 0
        for group, group_shapes in enumerate(shapes):
            for name, shape in group_shapes.items():
                numel = math.prod(shape)
                part = math.ceil(numel / split)
                self.spans[name] = (offset, part, numel, shape)
                self.group_of[name] = group
                offset += part
        if offset != per_rank:
            raise ConversionError(f"{folder}: ZeRO-3 shards hold {per_rank} elements per rank, the parameter shapes "
                                  f"account for {offset}")  # fmt: skip
        self._mapped: dict[str, list[_Flat]] | None = None
        self._read = 0

    def _flats(self, key: str, nbytes: int) -> list[_Flat]:
        """Each rank's flat groups of `key` ("fp32" or a moment), mapped again once `MAPPED_BUDGET` is read."""
        if self._mapped is None or self._read > self.MAPPED_BUDGET:
            self._mapped, self._read = None, 0  # the old mappings go with their last tensor
            states = [_load(p)["optimizer_state_dict"] for p in self.paths]
            n = len(states[0]["fp32_flat_groups"])
            self._mapped = {"fp32": [_Flat([g.reshape(-1) for g in st["fp32_flat_groups"]]) for st in states]}
            if self.has_moments:
                for m in MOMENTS:
                    self._mapped[m] = [_Flat([st["optimizer_state_dict"]["state"][i][m].reshape(-1) for i in range(n)])
                                       for st in states]  # fmt: skip
        self._read += nbytes
        return self._mapped[key]

    @property
    def names(self) -> list[str]:
        return list(self.spans)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(span[3]) for name, span in self.spans.items()}

    def _cut(self, key: str, name: str) -> torch.Tensor:
        span = self.spans[name]
        return _whole(self._flats(key, span[1] * self.world * 4), *span)

    def weight(self, name: str) -> torch.Tensor:
        """The whole fp32 master weight `name`."""
        return self._cut("fp32", name)

    def moments(self, name: str) -> dict[str, torch.Tensor]:
        """Adam's moments of `name` (empty when the optimizer had taken no step)."""
        return {m: self._cut(m, name) for m in MOMENTS} if self.has_moments else {}

    def buffers(self) -> dict[str, torch.Tensor]:
        return _buffers(self.model)


def open_zero3(folder: str | Path) -> ZeroShards:
    """The parameters of a ZeRO-3 checkpoint folder, to read one at a time."""
    folder = Path(folder)
    optim = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if not optim:
        raise ConversionError(f"{folder} holds no ZeRO-3 optimizer states")
    first = _load(optim[0])["optimizer_state_dict"]
    stage = _stage(first, optim[0])
    if stage != 3:
        raise ConversionError(f"{folder} was written at ZeRO stage {stage}, not 3")
    return ZeroShards(folder, first, optim)


def open_live(folder: str | Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """(name -> shape, read(name) -> whole tensor) of a checkpoint's live weights and buffers, one tensor at a
    time: ZeRO-3's fp32 masters cut from the memory-mapped shards; at ZeRO 0-2 the module file's tensors (the
    training dtype at ZeRO 1-2, whose fp32 masters are partitioned)."""
    folder = Path(folder)
    optim = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if optim:
        first = _load(optim[0])["optimizer_state_dict"]
        if _stage(first, optim[0]) == 3:
            z = ZeroShards(folder, first, optim)
            buffers = z.buffers()
            shapes = {**z.shapes, **{k: tuple(v.shape) for k, v in buffers.items()}}
            return shapes, lambda name: buffers[name] if name in buffers else z.weight(name)
    model_file = folder / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConversionError(f"{folder} holds no DeepSpeed model or optimizer states")
    module = _load(model_file)["module"]  # memory-mapped
    return {k: tuple(v.shape) for k, v in module.items()}, lambda name: module[name].clone()


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
        model = folder / "mp_rank_00_model_states.pt"
        if not model.is_file():
            raise ConversionError(f"{folder}: ZeRO stage {stage} checkpoint without mp_rank_00_model_states.pt")
        return _read_zero0(model, stage)
    z = ZeroShards(folder, first, optim)
    out = FullState(world=z.world, zero_stage=3, buffers=z.buffers(), group_of=dict(z.group_of))
    out.steps = z.steps
    out.loss_scaler = dict(z.loss_scaler)
    for name in z.names:
        out.weights[name] = z.weight(name)
        if with_moments and z.has_moments:
            out.moments[name] = z.moments(name)
    return out


def _buffers(model: dict) -> dict[str, torch.Tensor]:
    names = set(model.get("buffer_names", []))
    return {k: v.float() if v.is_floating_point() else v for k, v in model.get("module", {}).items() if k in names}


class _Flat:
    """A rank's flat groups, concatenated in thought only: a slice is cut from the groups it spans."""

    def __init__(self, groups: list[torch.Tensor]) -> None:
        self.groups = groups
        self.starts = [0]
        for g in groups:
            self.starts.append(self.starts[-1] + g.numel())

    def numel(self) -> int:
        return self.starts[-1]

    def slice(self, offset: int, n: int) -> torch.Tensor:
        pieces = []
        for g, start in zip(self.groups, self.starts):
            lo, hi = max(offset, start), min(offset + n, start + g.numel())
            if lo < hi:
                pieces.append(g[lo - start : hi - start])
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]


def _whole(per_rank: list[_Flat], offset: int, part: int, numel: int, shape: torch.Size) -> torch.Tensor:
    """One parameter from its ZeRO-3 shares: `part` elements at `offset` of each rank's flat, the padding cut."""
    return torch.cat([t.slice(offset, part).float() for t in per_rank])[:numel].view(shape).clone()


def _read_zero0(model_file: Path, stage: int = 0) -> FullState:
    """ZeRO 0-2 (every rank holds the whole module): the module's weights as saved (the weights only; at ZeRO 1-2
    in the training dtype, the fp32 masters being partitioned in the optimizer files)."""
    model = _load(model_file)
    out = FullState(world=1, zero_stage=stage, buffers=_buffers(model))
    out.weights = {k: v.float().clone() for k, v in model["module"].items() if k not in out.buffers}
    return out
