"""Worker for tests/engine/test_grad_scaler_zero3.py: megadalle/train.py's own `main`, with DeepSpeed's fp16
allowed on this CPU (it lacks the flag DeepSpeed checks; ../shared/PLATFORM.md: ZeRO 1-3 then run fp16 for real).

    [FP16_WORKER_POISON=BLOCK:UPDATE] [FP16_WORKER_DUMP=DIR] torchrun --nproc_per_node 2 tests/engine/fp16_worker.py
        --config ...

FP16_WORKER_POISON: on rank 0 only, the gradient leaving resblock BLOCK's branch (towards the identity path)
becomes Inf at update UPDATE (its forward count: no activation checkpointing, one micro-batch per update). The
block's parameter gradients stay finite, so only rank 0's activation flag knows: the skip on rank 1 proves the
flags are agreed across ranks. FP16_WORKER_DUMP: each rank saves its scaler state to DIR/scaler_RANK.pt at the end,
and its parameters' stored and gathered dtypes and its modules' output dtypes to DIR/dtypes_RANK.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

type(get_accelerator()).is_fp16_supported = lambda self: True

import megadalle.engine.wrap as wrap  # noqa: E402  (after the accelerator is told)
from megadalle.engine.grad_scaler import resblocks  # noqa: E402
from megadalle.train import main  # noqa: E402

SCALERS = []
DTYPES: dict[str, list[str]] = {}  # parameter or module name -> [stored, gathered] or [computed output]


def record_dtypes() -> None:
    """After the scaler's install: each parameter's stored partition dtype and gathered (communication) dtype,
    and, from the first forward, each module's output dtype."""
    from megadalle.engine import ds_grad_scaler

    original = ds_grad_scaler.install

    def install(optimizer, model, scaler):
        original(optimizer, model, scaler)
        for name, p in model.named_parameters():
            DTYPES[name] = [str(p.ds_tensor.dtype), str(getattr(p, "comm_dtype", p.ds_tensor.dtype))]

        def record(name, out):
            if isinstance(out, torch.Tensor):
                DTYPES.setdefault(f"out:{name}", [str(out.dtype)])

        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(lambda m, i, out, name=name: record(name, out))

    ds_grad_scaler.install = install


def instrument(poison: str) -> None:
    original = wrap.apply_grad_scaler

    def apply(model, replicas=1, **kw):
        scaler = original(model, replicas, **kw)
        SCALERS.append(scaler)
        if poison:
            block_index, update = map(int, poison.split(":"))
            block = resblocks(model)[block_index]
            branch, calls = block.branch, [0]

            def poisoned(x):
                calls[0] += 1
                if calls[0] == update and dist.get_rank() == 0:
                    x.register_hook(lambda g: g * float("inf"))
                return branch(x)

            block.branch = poisoned
        return scaler

    wrap.apply_grad_scaler = apply


if __name__ == "__main__":
    instrument(os.environ.get("FP16_WORKER_POISON", ""))
    record_dtypes()
    rc = main(sys.argv[1:])
    if os.environ.get("FP16_WORKER_DUMP") and SCALERS:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        dump = Path(os.environ["FP16_WORKER_DUMP"])
        torch.save(SCALERS[-1].state_dict(), dump / f"scaler_{rank}.pt")
        (dump / f"dtypes_{rank}.json").write_text(json.dumps(DTYPES))
    sys.exit(rc)
