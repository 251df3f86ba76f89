"""Two ranks of the debug dVAE under ZeRO-3 with `checkpoint.async_save`, driving engine/checkpoint.py's
Checkpointer as train.py does, in one of three modes (OUT/rank<R>.json records what happened):

- complete: a checkpoint queued after update 1 is completed by the updates after it (how many it took);
- crash: then a second one whose writes wait behind a blocked job, and the processes exit mid-write;
- fail: a queued write of rank 1 raises: the next update's agreement raises a CheckpointError on every rank,
  and the marker never comes, though rank 0 wrote all of its files.

    torchrun --nproc_per_node 2 tests/engine/async_worker.py MODE --config ... [--k=v ...]   (OUT: the run folder)
"""

from __future__ import annotations

import json
import os
import sys
import threading

from megadalle.config import load_config
from megadalle.engine.checkpoint import Checkpointer, CheckpointError, incomplete_reason
from megadalle.engine.denormals import flush_denormals
from megadalle.engine.distributed import barrier, init_distributed, shutdown
from megadalle.engine.ds_config import load_ds_config
from megadalle.stages import make_stage
from megadalle.train import build, train_update


def main() -> None:
    flush_denormals()
    mode, argv = sys.argv[1], sys.argv[2:]
    cfg = load_config(argv)
    out = cfg.run_dir
    rank, world = init_distributed()
    ds = load_ds_config(cfg, world)
    stage = make_stage(cfg)
    state = build(cfg, stage, ds)
    batches = stage.batches(rank)
    ckpt = Checkpointer(out / "checkpoints", cfg)
    step = 0
    record: dict = {"rank": rank}

    def update() -> None:
        nonlocal step
        metrics = train_update(state.engine, state.optimizer, stage, [next(batches)], stage.schedules(step),
                               flags=ckpt.flags())  # fmt: skip
        ckpt.observe(metrics)
        step += 1

    update()
    if mode == "fail" and rank == 1:  # one rank's disk is full; the other writes all of its files

        def full() -> None:
            raise OSError(28, "No space left on device")

        ckpt.writer.submit(full)
    first = ckpt.save(step, state)
    record["queued_complete"] = incomplete_reason(first) is None
    if mode == "fail":
        try:
            for _ in range(20):
                update()
        except CheckpointError as e:
            record["error"] = str(e)
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        shutdown()
        return
    for n in range(1, 50):
        update()
        if ckpt.pending is None:
            record["updates_to_complete"] = n
            break
    barrier()  # rank 0 completed it in `observe`
    record["complete"] = incomplete_reason(first) is None
    if mode == "crash":
        blocked = threading.Event()
        ckpt.writer.submit(lambda: blocked.wait(120))  # the next checkpoint's writes wait behind this
        ckpt.save(step, state)
        record["crashed_at"] = step
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        barrier()
        os._exit(0)  # mid-write: no marker, files missing
    ckpt.wait()
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main()
