"""Process-group helpers: initialisation for every launcher (deepspeed, torchrun, plain python), the rank
queries, and the reductions the training loop needs. The model code never imports this."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from megadalle.engine.launcher import free_port, rendezvous_env

__all__ = [
    "barrier",
    "free_port",
    "from_main",
    "init_distributed",
    "is_main",
    "rank",
    "shutdown",
    "sum_over_ranks",
    "sum_tensor_over_ranks",
    "world_size",
]


T = TypeVar("T")
LAUNCHER = "single"
"""Which launcher `init_distributed` found: env (torchrun, deepspeed), slurm, mpi or single."""

# printed (print(), not logged) by DeepSpeed 0.19.8 each time a process loads its shared-memory collective op,
# built or cached: a line per rank per start that says nothing the operator can act on
_SHM_OP_LINE = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"


@contextlib.contextmanager
def _without_line(line: str) -> Iterator[None]:
    """Hold back what is print()ed to stdout in the block, then print it all but the lines equal to `line`."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [ln for ln in buf.getvalue().splitlines(keepends=True) if ln.rstrip("\n") != line]
        sys.stdout.write("".join(kept))


def init_distributed(collective_timeout_s: float = 1800.0) -> tuple[int, int]:
    """(rank, world size), from whichever launcher started the process (engine/launcher.py: torchrun, deepspeed,
    Slurm's srun, MPI; a plain `python train.py` is a world of one). Every collective fails after
    `collective_timeout_s` instead of waiting forever for a rank that hangs."""
    if not torch.cuda.is_available():
        # Without a CUDA device DeepSpeed's accelerator detection ends, on this project's machines, on the CPU with
        # a warning per process start ("Setting accelerator to CPU. If you have GPU ..."); naming the CPU
        # accelerator before the first import is the same choice without the warning. A DS_ACCELERATOR set by the
        # user (xpu, npu, hpu, mps) wins.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed 0.19.8's ZeRO-3 calls these two collectives, which torch 2.13 deprecates: one FutureWarning per
    # call (120 lines for the demo prior) about code that is not ours. Silenced by exact message and module.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )

    global LAUNCHER
    LAUNCHER = rendezvous_env()
    if torch.cuda.is_available():  # before any collective: NCCL uses the current device of each rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with _without_line(_SHM_OP_LINE):
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timedelta(seconds=collective_timeout_s),
        )
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_over_ranks(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """One all-reduce of a dict of scalars: the sum over ranks of each value, as floats."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().cpu().reshape(()) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
            t = t.cuda()
        dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t)}


def sum_tensor_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """One all-reduce of a tensor of any shape: the elementwise sum over ranks, a new tensor on `t`'s device."""
    out = t.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        on = out.cuda() if dist.get_backend() == "nccl" and not out.is_cuda else out  # NCCL reduces device tensors
        dist.all_reduce(on)
        out = on.to(t.device)
    return out


def from_main(make: Callable[[], T]) -> T:
    """make() on rank 0, its result sent to every rank (one broadcast): what each rank would otherwise fetch for
    itself, such as a listing of 40,000 shards from S3. An error on rank 0 is raised on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", make())
        except Exception as e:
            try:
                pickle.dumps(e)
                box[0] = ("error", e)
            except Exception:  # an exception that cannot travel: its text does
                box[0] = ("error", RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def shutdown(barrier: bool = True) -> None:
    """A clean exit: a barrier, then the process group destroyed (gloo otherwise may abort at interpreter exit)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
