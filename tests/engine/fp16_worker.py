"""Worker for tests/engine/test_grad_scaler_zero3.py: megadalle/train.py's own `main`, with DeepSpeed's fp16
allowed on this CPU (it lacks the flag DeepSpeed checks; ../shared/PLATFORM.md: ZeRO 1-3 then run fp16 for real).

    [FP16_WORKER_POISON=BLOCK:UPDATE] torchrun --nproc_per_node 2 tests/engine/fp16_worker.py --config ...

FP16_WORKER_POISON: on rank 0 only, the gradient entering resblock BLOCK's branch becomes Inf at update UPDATE
(its forward count: no activation checkpointing, one micro-batch per update), to test the skip across ranks.
"""

import os
import sys

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

type(get_accelerator()).is_fp16_supported = lambda self: True

import megadalle.engine.wrap as wrap  # noqa: E402  (after the accelerator is told)
from megadalle.engine.grad_scaler import resblocks  # noqa: E402
from megadalle.train import main  # noqa: E402


def poison(block_index: int, update: int) -> None:
    original = wrap.apply_grad_scaler

    def apply(model, replicas=1, **kw):
        scaler = original(model, replicas, **kw)
        block = resblocks(model)[block_index]
        branch, calls = block.branch, [0]

        def poisoned(x):
            y = branch(x)
            calls[0] += 1
            if calls[0] == update and dist.get_rank() == 0:
                y.register_hook(lambda g: g * float("inf"))
            return y

        block.branch = poisoned
        return scaler

    wrap.apply_grad_scaler = apply


if __name__ == "__main__":
    if os.environ.get("FP16_WORKER_POISON"):
        poison(*map(int, os.environ["FP16_WORKER_POISON"].split(":")))
    sys.exit(main(sys.argv[1:]))
