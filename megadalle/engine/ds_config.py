"""Fill a DeepSpeed JSON from the JobConfig.

The DeepSpeed file keeps what is DeepSpeed's own (ZeRO stage, offload, bucket sizes). The values the
JobConfig owns are written there as "auto" and filled here; a value that is not "auto" must agree with
the JobConfig, else `ValueError` names the key, both values and the file.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from megadalle.config import ConfigError, JobConfig

AUTO = "auto"


def _owned_values(cfg: JobConfig, world_size: int) -> dict[tuple[str, ...], tuple[Any, str]]:
    """Key path in the DeepSpeed JSON -> (value from the JobConfig, the JobConfig field it comes from)."""
    t, o = cfg.train, cfg.optim
    accum = cfg.grad_accum_steps(world_size)
    return {
        ("train_micro_batch_size_per_gpu",): (t.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps",): (accum, "train.grad_accum_steps (or train.global_batch_size)"),
        ("train_batch_size",): (
            t.micro_batch_size * accum * world_size,
            f"train.micro_batch_size * train.grad_accum_steps * world_size({world_size})",
        ),
        ("gradient_clipping",): (o.grad_clip, "optim.grad_clip"),
        ("fp16", "enabled"): (t.precision == "fp16", "train.precision"),
        ("bf16", "enabled"): (t.precision == "bf16", "train.precision"),
        ("optimizer", "params", "lr"): (o.lr, "optim.lr"),
        ("optimizer", "params", "betas"): ([o.beta1, o.beta2], "optim.beta1, optim.beta2"),
        ("optimizer", "params", "eps"): (o.eps, "optim.eps"),
        ("optimizer", "params", "weight_decay"): (o.weight_decay, "optim.weight_decay"),
    }


def _agree(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_agree(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def fill_ds_config(ds: dict[str, Any], cfg: JobConfig, world_size: int, origin: str = "<ds config>") -> dict[str, Any]:
    """Return a copy of `ds` with the JobConfig-owned values filled in.

    A missing top-level key is added (`train_micro_batch_size_per_gpu`, ...); a missing optional table
    (`fp16`, `bf16`, `optimizer`) is added only when it is needed (fp16/bf16 enabled); the optimizer's
    params are filled only when the file declares an optimizer.
    """
    out = copy.deepcopy(ds)
    for keys, (value, source) in _owned_values(cfg, world_size).items():
        node = out
        for k in keys[:-1]:
            if k not in node:
                if k in ("fp16", "bf16") and value:
                    node[k] = {}
                else:
                    node = None
                    break
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"{origin}: '{'.'.join(keys[:-1])}' must be a JSON object")
        if node is None:
            continue
        last = keys[-1]
        if last not in node or node[last] == AUTO:
            node[last] = value
        elif not _agree(node[last], value):
            raise ConfigError(
                f"{origin}: '{'.'.join(keys)}' is {node[last]!r} but the JobConfig gives {value!r} "
                f'({source}); write "auto" there and set it in the JobConfig'
            )
    if out.get("fp16", {}).get("enabled") and out.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{origin}: fp16 and bf16 are both enabled")
    if out.get("torch_autocast", {}).get("enabled") and cfg.train.precision != "fp16":
        raise ConfigError(f"{origin}: torch_autocast is enabled but train.precision is {cfg.train.precision} "
                          "(megadalle enables it itself for fp16 with train.grad_scaler = per_resblock)")  # fmt: skip
    if cfg.optim.moments == "paper16":  # engine/adam16.py, a client optimizer ZeRO has not been told of
        out["zero_allow_untested_optimizer"] = True
    mode = grad_scaler_mode(cfg, out, origin)
    if mode == "global" and out.get("zero_optimization", {}).get("stage", 0) == 0:
        # DeepSpeed 0.19.8's engine.backward scales the loss only for ZeRO optimizers: its ZeRO-0 FP16_Optimizer
        # then divides unscaled gradients by the loss scale (updates ~2^-16 too small, clipping and the logged
        # gradient norm off by the scale); a static scale of 1 (train.grad_scaler = none) is right
        raise ConfigError(f"{origin}: train.precision = fp16 with zero_optimization.stage = 0 does not train in "
                          "DeepSpeed 0.19.8 (the loss is never multiplied by the loss scale its optimizer divides "
                          "by): use ZeRO 1-3 for fp16, train.grad_scaler = none, or bf16")  # fmt: skip
    if mode == "none":
        out["fp16"]["loss_scale"] = 1  # no scaling: DeepSpeed's loss scale static at 1
    if mode == "per_resblock":
        out.update(_autocast_fp16(out, origin))
    return out


# The module classes whose parameters torch.autocast computes in fp16 and ZeRO-3 gathers in fp16: the matmul
# weights (every other parameter, and the Linear biases, which engine/ds_grad_scaler.py takes back, stay fp32).
FP16_MATMUL_MODULES = ["megadalle.models.layers.Linear"]
FP16_NAMES = ("torch.float16", "torch.half", "float16", "fp16", "half")  # DeepSpeed's spellings of fp16


def _autocast_fp16(ds: dict[str, Any], origin: str) -> dict[str, Any]:
    """The DeepSpeed tables of per-resblock scaling: App. D.2 stores gains, biases, embeddings and unembeddings
    in fp32 under fp16, which ZeRO-3's fp16 mode cannot (it casts every parameter to one dtype), so fp16 runs
    through DeepSpeed's `torch_autocast` instead: every parameter partition fp32 (shared with the optimizer's
    master copy), matmuls in fp16, the matmul weights gathered and reduced in fp16; DeepSpeed's own fp16 loss
    scaling is off and the scaler sets the loss scale (engine/ds_grad_scaler.py)."""
    ds.pop("fp16")  # its loss-scale settings are DeepSpeed's global scaler's (train.grad_scaler = global)
    dtype = ds.get("torch_autocast", {}).get("dtype", "torch.float16")
    if dtype not in FP16_NAMES:
        raise ConfigError(f"{origin}: torch_autocast.dtype is {dtype!r} but train.precision is fp16")
    data_types = {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}
    return {"torch_autocast": {"enabled": True, "dtype": "torch.float16",
                               "lower_precision_safe_modules": FP16_MATMUL_MODULES},
            "data_types": data_types}  # fmt: skip


def grad_scaler_mode(cfg: JobConfig, ds: dict[str, Any], origin: str = "<ds config>") -> str:
    """`train.grad_scaler` resolved against the filled DeepSpeed config: "off" unless fp16; `auto` is
    per_resblock for the prior under ZeRO-3, else global; per_resblock elsewhere is an error."""
    autocast = ds.get("torch_autocast", {})
    autocast_fp16 = bool(autocast.get("enabled")) and autocast.get("dtype", "torch.float16") in FP16_NAMES
    if not (ds.get("fp16", {}).get("enabled") or autocast_fp16):
        return "off"
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    mode = cfg.train.grad_scaler
    if mode == "auto":
        return "per_resblock" if cfg.job.stage == "prior" and zero == 3 else "global"
    if mode == "per_resblock" and (cfg.job.stage != "prior" or zero != 3):
        raise ConfigError(f"{origin}: train.grad_scaler = per_resblock needs the prior's resblocks and ZeRO-3's "
                          f"optimizer, got job.stage = {cfg.job.stage}, zero_optimization.stage = {zero}")  # fmt: skip
    if autocast_fp16 and mode != "per_resblock":  # megadalle's fp16 autocast is the per-resblock scaler's route
        raise ConfigError(f"{origin}: torch_autocast in fp16 runs only with train.grad_scaler = per_resblock "
                          f"(resolved: {mode}); remove the torch_autocast table")  # fmt: skip
    return mode


def load_ds_config(cfg: JobConfig, world_size: int, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read `parallel.deepspeed_config` (or `path`) and fill it from `cfg`."""
    path = Path(path or cfg.parallel.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: the DeepSpeed config must be a JSON object")
    return fill_ds_config(ds, cfg, world_size, origin=str(path))
