"""Training techniques applied to a model from outside, in one place (torchtitan's `apply_ac`): the model keeps
only its math and exposes a seam, `model.run_block(block, x)`, through which every resblock is called. Each
technique composes a wrapper around it. The per-resblock gradient scaler (fp16, engine/grad_scaler.py) is one
more technique (`apply_grad_scaler`: it replaces each resblock's `residual` join, so blocks keep their
`__call__`), applied under fp16 with `train.grad_scaler = per_resblock`; train.py installs its DeepSpeed side
(engine/ds_grad_scaler.py) after `deepspeed.initialize`.

Two more techniques for speed (issue 29):
- `train.compile`: torch.compile per resblock (torchtitan compiles each TransformerBlock): the prior's attention and
  MLP branches f(x) (the residual join, where the per-resblock scaler sits, stays eager), the dVAE's resblocks,
  the reranker's text blocks and conv stages. Parameter names and checkpoints are unchanged. Activation
  checkpointing recomputes the compiled branch; under ZeRO-3 DeepSpeed's gather hooks (compiler-disabled) split
  a block's graph at its submodules. Dynamo's recompile limit is raised to cover the compiled blocks' modules,
  train and eval, and hitting it is an error, never a silent fallback to eager.
- `train.autocast`: bf16 matmuls and convolutions under torch.autocast from fp32 parameters (torch AMP), entered
  inside the model's forward (`apply_autocast`) and around the evaluations (`autocast(model, device)`); the models
  keep their losses, the prior's heads and LayerNorms and the dVAE's output convolutions in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megadalle.config import ConfigError, JobConfig
from megadalle.engine.grad_scaler import apply_grad_scaler
from megadalle.models.transformer import AttentionBlock, BlockRunner, DallePrior, MLPBlock

log = logging.getLogger(__name__)


def checkpointed(inner: BlockRunner) -> BlockRunner:
    """Recompute the resblock's activations in backward instead of storing them (training mode only). The block
    is called through its `__call__`, so ZeRO-3 gathers its parameters again for the recomputation."""

    def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not block.training:
            return inner(block, x)
        return checkpoint(inner, block, x, use_reentrant=False)

    return run


def apply_activation_checkpointing(model: DallePrior) -> DallePrior:
    """Checkpoint every resblock of a model that has the `run_block` seam (the prior)."""
    model.run_block = checkpointed(model.run_block)
    return model


def native_bf16(device_type: str) -> bool:
    """Whether `device_type` computes bf16 matmuls natively: a CUDA GPU that supports bf16, a CPU with AVX512-BF16
    or AMX (elsewhere oneDNN converts to fp32 and bf16 is slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_autocast(mode: str, device_type: str) -> torch.dtype | None:
    """train.autocast -> the autocast dtype, or None (fp32): `auto` is bf16 where `native_bf16`."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "auto":
        return torch.bfloat16 if native_bf16(device_type) else None
    raise ConfigError(f"train.autocast must be off, bf16 or auto, got {mode!r}")


def autocast(model: nn.Module, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast `apply_wrappers` chose for `model` (its `autocast_dtype`), on `device`; a no-op without one.
    For code that calls the model's parts directly (the evaluations); its forward enters it by itself."""
    dtype = getattr(model, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def apply_autocast(model: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """`model.forward` under torch.autocast(dtype), entered inside the forward: DeepSpeed's engine switches an outer
    CUDA autocast off around the module unless its own `torch_autocast` is configured, and a stage's work around
    the model (the dVAE's k-means code assignment) stays fp32."""
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    model.autocast_dtype = dtype


def compile_units(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, method name) of each block `train.compile` compiles."""
    from megadalle.models.clip import ConvStage, TextBlock
    from megadalle.models.dvae import ResBlock

    units: list[tuple[nn.Module, str]] = []
    for m in model.modules():
        if isinstance(m, (AttentionBlock, MLPBlock)):
            units.append((m, "branch"))  # f(x): the residual join (the per-resblock scaler's seam) stays eager
        elif isinstance(m, (ResBlock, TextBlock, ConvStage)):
            units.append((m, "forward"))
    return units


def check_compile_toolchain(device_type: str) -> None:
    """Inductor writes C++ for the CPU and needs a C compiler for Triton's launchers on a GPU: a clear error now
    rather than an InductorError at the first update."""
    if device_type == "cpu":
        from torch._inductor import config as inductor_config

        wanted = inductor_config.cpp.cxx
        names = [c for c in (wanted if isinstance(wanted, (list, tuple)) else (wanted,)) if c] or ["g++"]
        if not any(shutil.which(c) for c in names):
            raise ConfigError(f"train.compile: inductor compiles C++ for the CPU but no compiler ({', '.join(names)}) "
                              "is on PATH: install g++ (apt-get install g++, make sysdeps) or set "
                              "train.compile = false")  # fmt: skip
    elif not (shutil.which("gcc") or shutil.which("cc")):
        raise ConfigError("train.compile: Triton needs a C compiler (gcc or cc) to build its kernel launchers: "
                          "install gcc or set train.compile = false")  # fmt: skip


def apply_compile(model: nn.Module, device_type: str) -> int:
    """torch.compile every block of `compile_units` in place (the compiled function replaces the method on the
    instance; parameters, names and state_dict stay). Returns the number of blocks. The instance attributes hold
    the original blocks' bound methods (as `apply_autocast`'s forward does): save state_dicts, never pickle or
    deepcopy a wrapped model (a copy would call the original's methods)."""
    check_compile_toolchain(device_type)
    units = compile_units(model)
    if not units:
        raise ConfigError(f"train.compile: {type(model).__name__} has no blocks to compile")
    cfg = torch._dynamo.config
    # Frames dynamo compiles: each block's, and under ZeRO-3 (a graph break at every submodule's gather hook) each
    # submodule's forward, once per shape, static attribute (a conv's width) and grad mode: bound by the modules
    # compiled x (train, eval, a last partial batch, margin). A bound, not a budget: blocks of one shape share code.
    limit = 8 + 4 * sum(len(list(m.modules())) for m, _ in units)
    cfg.recompile_limit = max(cfg.recompile_limit, limit)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 64 * limit)
    cfg.fail_on_recompile_limit_hit = True  # an error, never dynamo's silent fallback to eager
    for m, name in units:
        setattr(m, name, torch.compile(getattr(m, name)))
    return len(units)


def eager_module_hooks(model: nn.Module) -> int:
    """Every forward (pre-)hook of `model`'s modules run eagerly, outside dynamo (`torch.compiler.disable`): ZeRO-3's
    gather and pre-backward hooks (DeepSpeed registers them at `deepspeed.initialize`, some not compiler-disabled)
    would otherwise be traced once per module type and class of output, past any recompile limit. Called after
    `deepspeed.initialize` under train.compile; returns the number of hooks wrapped."""
    n = 0
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key, fn in list(hooks.items()):
                if not getattr(fn, "_megadalle_eager", False):
                    eager = torch.compiler.disable(fn)
                    eager._megadalle_eager = True
                    hooks[key] = eager
                    n += 1
    return n


def apply_wrappers(
    model: nn.Module, cfg: JobConfig, grad_scaler: str = "off", device_type: str | None = None
) -> nn.Module:
    """Every training wrapper the job asks for, in one place (train.py calls this once, before DeepSpeed).
    `grad_scaler`: the resolved mode (engine/ds_config.py's `grad_scaler_mode`); `device_type`: where the job
    computes (default: DeepSpeed's accelerator), for `train.autocast = auto` and the compile toolchain."""
    if device_type is None:
        from deepspeed.accelerator import get_accelerator

        device_type = get_accelerator().device_name()  # DeepSpeed's choice (DS_ACCELERATOR=cpu on a GPU host)
    if cfg.train.activation_checkpointing:
        if not isinstance(model, DallePrior):
            raise ConfigError(
                f"train.activation_checkpointing: {type(model).__name__} (job.stage={cfg.job.stage}) has no "
                "resblock seam; activation checkpointing covers the prior"
            )
        apply_activation_checkpointing(model)
    if grad_scaler == "per_resblock":
        if not isinstance(model, DallePrior):
            raise ConfigError(f"train.grad_scaler = per_resblock: {type(model).__name__} has no resblocks")
        model.grad_scaler = apply_grad_scaler(model)
    dtype = resolve_autocast(cfg.train.autocast, device_type)
    if dtype is not None:
        apply_autocast(model, dtype, device_type)  # sets model.autocast_dtype, which `autocast` reads
    if cfg.train.autocast != "off":
        log.info(f"train.autocast = {cfg.train.autocast}: "
                 + (f"bf16 matmuls and convolutions on {device_type}" if dtype else
                    f"fp32 ({device_type} has no native bf16)"))  # fmt: skip
    if cfg.train.compile:
        n = apply_compile(model, device_type)
        log.info(f"train.compile: {n} blocks compiled with torch.compile on first use (time logged after update 2)")
    return model
