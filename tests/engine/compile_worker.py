"""Worker for tests/engine/test_compile.py: train.py's build and train_update, eager then compiled, in one process.

    torchrun --nproc_per_node N tests/engine/compile_worker.py BATCHES.pt OUT.pt -- --config ... [--k=v ...]

BATCHES.pt: {"steps": [[micro-batches of rank 0, of rank 1, ...], ...]}. For each of train.compile false and true
the model is built from the job's seed and trained on the same batches (the same random draws per update), then
evaluated with its EMA through train.py's `_evaluate`; rank 0 writes OUT.pt with each run's global losses, final
parameters (gathered), evaluation metrics, the number of compiled blocks and of graphs dynamo compiled.
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from megadalle.config import load_config
from megadalle.engine.denormals import flush_denormals
from megadalle.engine.distributed import init_distributed
from megadalle.engine.ds_config import load_ds_config
from megadalle.engine.metrics import MetricsLogger
from megadalle.engine.optim import reset_moments
from megadalle.engine.wrap import compile_units
from megadalle.stages import make_stage
from megadalle.train import _evaluate, build, train_update


def main() -> None:
    flush_denormals()
    batches_path, out_path = sys.argv[1], sys.argv[2]
    rank, world = init_distributed()
    argv = sys.argv[sys.argv.index("--") + 1 :]
    steps = torch.load(batches_path)["steps"]
    out: dict = {}
    for compiled in (False, True):
        cfg = load_config([*argv, f"--train.compile={str(compiled).lower()}"])
        stage = make_stage(cfg)
        state = build(cfg, stage, load_ds_config(cfg, world))
        engine, optimizer = state.engine, state.optimizer
        losses = []
        for step, per_rank in enumerate(steps):
            torch.manual_seed(1000 + step)  # the same gumbel draws in both runs
            if step == stage.moments_reset_step:
                reset_moments(optimizer)
            losses.append(train_update(engine, optimizer, stage, per_rank[rank], stage.schedules(step))["loss"])
            if state.ema is not None:
                state.ema.update()
        torch.manual_seed(0)
        run_dir = Path(cfg.run_dir) / ("compiled" if compiled else "eager")
        logger = MetricsLogger(None, 1, stage.readable)
        evaluation = _evaluate(stage, engine, state.ema, len(steps), run_dir, logger)  # EMA in, no_grad: recompiles
        logger.close()
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_tensor")):
            final = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        units = compile_units(engine.module)
        n_compiled = sum(type(getattr(m, name)).__name__ != "method" for m, name in units)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # what dynamo really compiled so far
        out["compiled" if compiled else "eager"] = {
            "losses": losses, "final": final, "n_compiled": n_compiled, "n_units": len(units), "graphs": graphs,
            "eval": evaluation,
        }  # fmt: skip
        del engine, optimizer, state
    if rank == 0:
        torch.save(out, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
