"""One rank of a ZeRO-3 prior after an update: the bytes of its model states, as DeepSpeed holds them, and of the
checkpoint it then writes (its DeepSpeed files and EMA shard; rank 0's extra.pt), to OUT/rank<R>.json
(tests/engine/test_planner.py compares them with megadalle/engine/planner.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from megadalle.config import load_config
from megadalle.engine.checkpoint import EXTRA, save_checkpoint
from megadalle.engine.denormals import flush_denormals
from megadalle.engine.distributed import init_distributed, shutdown
from megadalle.engine.ds_config import load_ds_config
from megadalle.stages import make_stage
from megadalle.train import build, train_update


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def main() -> None:
    flush_denormals()  # before the first torch operation starts the thread pool
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(argv)
    rank, world = init_distributed()
    ds = load_ds_config(cfg, world)
    stage = make_stage(cfg)
    state = build(cfg, stage, ds)
    engine, optimizer = state.engine, state.optimizer
    batches = stage.batches(rank)
    train_update(engine, optimizer, stage, [next(batches)], stage.schedules(0))
    opt = engine.optimizer
    params = 0
    for p in engine.module.parameters():
        params += nbytes(p.data) if getattr(p, "ds_persist", False) else nbytes(p.ds_tensor)
    master = sum(nbytes(t) for t in opt.fp32_partitioned_groups_flat)
    shared = all(a.data_ptr() == b.data_ptr() for a, b in zip(opt.fp32_partitioned_groups_flat,
                                                             opt.fp16_partitioned_groups_flat))  # fmt: skip
    moments = sum(nbytes(v) for st in opt.optimizer.state.values() for k, v in st.items()
                  if torch.is_tensor(v) and k != "step")  # fmt: skip
    grads = (
        nbytes(opt.grad_partitions_flat_buffer) if getattr(opt, "grad_partitions_flat_buffer", None) is not None else 0
    )
    record = {"rank": rank, "world": world, "params": params, "master": 0 if shared else master, "moments": moments,
              "grads": grads}  # fmt: skip
    folder = save_checkpoint(out / "checkpoints", 1, state, cfg, keep=0)
    own = [*folder.glob(f"*zero_pp_rank_{rank}_*"), *folder.glob(f"ema_shard{rank:05d}.safetensors")]
    record["checkpoint_rank"] = sum(f.stat().st_size for f in own)
    record["checkpoint_extra"] = (folder / EXTRA).stat().st_size
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main()
