"""Worker for the multi-process training tests: megadalle/train.py's own `main`; with TRAIN_WORKER_DUMP=DIR each
rank also writes, at every checkpoint, the whole model as it gathers it to DIR/params_RANK_stepSTEP.pt, and its
EMA to DIR/ema_RANK_stepSTEP.pt where the run keeps one.

    [TRAIN_WORKER_DUMP=DIR] torchrun --nproc_per_node N tests/engine/train_worker.py --config ...
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import megadalle.train as train
from megadalle.engine.checkpoint import gathered_state


def instrument(out: Path) -> None:
    original = train.save_checkpoint

    def save(engine, root, step, ema, *args, **kwargs):
        state = gathered_state(engine)  # collective: every rank gathers every parameter
        torch.save(state, out / f"params_{dist.get_rank()}_step{step}.pt")
        if ema is not None:  # and its EMA
            torch.save(ema.full_state_dict(), out / f"ema_{dist.get_rank()}_step{step}.pt")
        return original(engine, root, step, ema, *args, **kwargs)

    train.save_checkpoint = save


if __name__ == "__main__":
    if os.environ.get("TRAIN_WORKER_DUMP"):
        instrument(Path(os.environ["TRAIN_WORKER_DUMP"]))
    sys.exit(train.main(sys.argv[1:]))
