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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` is not installed
import megadalle.train as train  # noqa: E402
from tests.engine.gather import gathered_ema, gathered_params  # noqa: E402


def instrument(out: Path) -> None:
    original = train.Checkpointer.save

    def save(self, step, state, *args, **kwargs):
        params = gathered_params(state.engine)  # collective: every rank gathers every parameter
        torch.save(params, out / f"params_{dist.get_rank()}_step{step}.pt")
        if state.ema is not None:  # and its EMA
            torch.save(gathered_ema(state.ema), out / f"ema_{dist.get_rank()}_step{step}.pt")
        return original(self, step, state, *args, **kwargs)

    train.Checkpointer.save = save


if __name__ == "__main__":
    if os.environ.get("TRAIN_WORKER_DUMP"):
        instrument(Path(os.environ["TRAIN_WORKER_DUMP"]))
    sys.exit(train.main(sys.argv[1:]))
