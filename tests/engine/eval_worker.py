"""Worker for tests/engine/test_distributed_eval.py: a few updates of a stage with an EMA, through train.py's own
`build` and `train_update`; then, with EVALUATE=1, train.py's `_evaluate` on the engine; then one more update.

    torchrun --nproc_per_node N tests/engine/eval_worker.py OUT EVALUATE --config ... [--section.key=value ...]

Each rank writes OUT/rank{R}.json: the metrics `_evaluate` returned on it, whether every parameter partition,
every parameter's own data (whole for ZeRO-3's persistent ones), the optimizer's fp32 partitions and its moments
were bit-identical after the evaluation, whether the module was back in training mode, the loss of the next update
and a digest of the whole parameters after it. Rank 0 also writes OUT/ema.pt and OUT/live.pt, the whole EMA and live
weights before the next update (gathered here, for the test's single-process references), and the evaluation's
images under OUT/images.
"""

import gc
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` is not installed
import megadalle.train as train  # noqa: E402
from megadalle.config import load_config  # noqa: E402
from megadalle.engine.distributed import init_distributed, shutdown  # noqa: E402
from megadalle.engine.ds_config import load_ds_config  # noqa: E402
from megadalle.engine.metrics import MetricsLogger  # noqa: E402
from megadalle.stages import make_stage  # noqa: E402
from tests.engine.gather import gathered_ema, gathered_params  # noqa: E402

UPDATES = 3
PERSISTENCE_THRESHOLD = 1000
"""ZeRO-3 keeps parameters of fewer elements whole on every rank (biases, gains) and partitions the others: both
kinds are swapped."""


def held_state(engine) -> list[torch.Tensor]:
    """Copies of everything an evaluation must leave as it found it, as raw bytes."""
    tensors = []
    for p in engine.module.parameters():
        tensors += [p.ds_tensor, p.data] if hasattr(p, "ds_tensor") else [p.data]
    opt = engine.optimizer
    tensors += list(getattr(opt, "fp32_partitioned_groups_flat", []))  # ZeRO-3's master partitions
    tensors += list(getattr(opt, "single_partition_of_fp32_groups", []))  # ZeRO-1/2's
    for state in opt.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return [t.detach().reshape(-1).clone().view(torch.uint8) for t in tensors]


def main() -> None:
    out, evaluate, argv = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
    rank, world = init_distributed()
    cfg = load_config(argv)
    ds = load_ds_config(cfg, world)
    if ds["zero_optimization"]["stage"] == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE_THRESHOLD
    stage = make_stage(cfg)
    state = train.build(cfg, stage, ds)
    engine, optimizer, ema = state.engine, state.optimizer, state.ema
    assert ema is not None, "the test's config keeps an EMA (optim.ema_decay > 0)"
    batches = stage.batches(rank)
    for step in range(UPDATES):
        train.train_update(engine, optimizer, stage, [next(batches)], stage.schedules(step))
        ema.update()
    rec: dict = {}
    if evaluate:
        before = held_state(engine)
        logger = MetricsLogger(out / "metrics.jsonl" if rank == 0 else None, 1, stage.readable)
        rec["metrics"] = train._evaluate(stage, engine, ema, UPDATES, out, logger)
        logger.close()
        after = held_state(engine)
        rec["held"] = len(before)
        rec["unchanged"] = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
        rec["training"] = engine.module.training
    whole, live = gathered_ema(ema), gathered_params(engine)  # collectives
    if rank == 0:
        torch.save(whole, out / "ema.pt")
        torch.save(live, out / "live.pt")
    rec["next_loss"] = train.train_update(engine, optimizer, stage, [next(batches)], stage.schedules(UPDATES))["loss"]
    params = gathered_params(engine)  # collective
    rec["digest"] = hashlib.sha256(b"".join(params[n].numpy().tobytes() for n in sorted(params))).hexdigest()
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    del state, engine, optimizer, ema  # before the process group goes: the 2-process gloo exit abort (PLATFORM.md)
    gc.collect()
    shutdown()


if __name__ == "__main__":
    main()
