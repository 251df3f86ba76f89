"""One rank of a ZeRO-3 prior (EMA kept) after an update: the extra peak resident memory of a checkpoint save, an
evaluation (the EMA swapped in, every rank on its share) and a resume into the same engine, to OUT/rank<R>.json
(tests/engine/test_checkpoint_memory.py).

Each phase: the kernel's peak-RSS mark reset (/proc/self/clear_refs, "5"), the resident size read, the phase run,
the new peak read; extra = peak - resident before. The test runs it with glibc returning freed blocks of 64 KiB and
more to the system at once (MALLOC_MMAP_THRESHOLD_), so that what a phase frees does not hide what the next one
allocates.

    torchrun --nproc_per_node N tests/engine/checkpoint_memory_worker.py OUT --config ... [--k=v ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` is not installed

from megadalle.config import load_config  # noqa: E402
from megadalle.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from megadalle.engine.denormals import flush_denormals  # noqa: E402
from megadalle.engine.distributed import barrier, init_distributed, shutdown  # noqa: E402
from megadalle.engine.ds_config import load_ds_config  # noqa: E402
from megadalle.engine.metrics import MetricsLogger  # noqa: E402
from megadalle.stages import make_stage  # noqa: E402
from megadalle.train import _evaluate, build, train_update  # noqa: E402


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def extra_peak(run) -> int:
    """Bytes resident at the peak of `run()` beyond those resident before it."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) back to the current resident size
    before = status_kib("VmRSS")
    run()
    return (status_kib("VmHWM") - before) * 1024


def main() -> None:
    flush_denormals()
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(argv)
    rank, world = init_distributed()
    ds = load_ds_config(cfg, world)
    stage = make_stage(cfg)
    state = build(cfg, stage, ds)
    batches = stage.batches(rank)
    train_update(state.engine, state.optimizer, stage, [next(batches)], stage.schedules(0))
    state.ema.update()
    params = list(state.engine.module.parameters())
    record = {
        "rank": rank,
        "world": world,
        "model_bytes": 4 * sum(p.ds_numel for p in params),
        "largest_bytes": 4 * max(p.ds_numel for p in params),
        "shard_bytes": 4 * sum(p.ds_tensor.numel() for p in params),
    }
    root = out / "checkpoints"
    logger = MetricsLogger(None, 1, [])
    barrier()
    record["save"] = extra_peak(lambda: save_checkpoint(root, 1, state, cfg, keep=0))
    barrier()
    record["evaluate"] = extra_peak(lambda: record.update(metrics=_evaluate(stage, state.engine, state.ema, 1, out,
                                                                           logger)))  # fmt: skip
    barrier()
    record["resume"] = extra_peak(lambda: load_checkpoint(root / "step_00000001", state))
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    shutdown()


if __name__ == "__main__":
    main()
