"""Worker for tests/engine/test_equivalence.py: the ZeRO-3 side, through train.py's own build and update.

    torchrun --nproc_per_node 2 tests/engine/equivalence_worker.py BATCHES.pt OUT.pt -- --config ... [--k=v ...]

BATCHES.pt: {"steps": [[micro-batches of rank 0, micro-batches of rank 1], ...]}. Rank 0 writes OUT.pt with the
gathered initial parameters, the optimizer groups (parameter names per group, and DeepSpeed's lr and weight
decay per group), the parameters after one update with zero gradients (weight decay alone), the global loss of
each update and the final parameters. Nothing is printed: results travel through the file only.
"""

import sys

import deepspeed
import torch
import torch.distributed as dist

from megadalle.config import load_config
from megadalle.engine.denormals import flush_denormals
from megadalle.engine.distributed import init_distributed
from megadalle.engine.ds_config import load_ds_config
from megadalle.engine.optim import group_names, reset_moments
from megadalle.stages import make_stage
from megadalle.train import build, train_update


def gathered(engine) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def main() -> None:
    flush_denormals()  # before the first torch operation starts the thread pool
    batches_path, out_path = sys.argv[1], sys.argv[2]
    rank, world = init_distributed()
    cfg = load_config(sys.argv[sys.argv.index("--") + 1 :])
    ds = load_ds_config(cfg, world)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every parameter
    steps = torch.load(batches_path)["steps"]
    stage = make_stage(cfg)
    out: dict = {}

    # weight decay alone: one update whose gradients are all zero (Adam's moments stay 0, so only decay acts)
    state = build(cfg, stage, ds)
    engine, optimizer = state.engine, state.optimizer
    assert all(hasattr(p, "ds_tensor") for p in engine.module.parameters()), "ZeRO-3 must shard every parameter"
    out["init"] = gathered(engine)
    out["groups"] = group_names(engine.module, stage.param_groups(engine.module))
    out["ds_groups"] = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    sched = stage.schedules(0)
    for group in optimizer.param_groups:
        group["lr"] = sched["lr"]
    for batch in steps[0][rank]:  # every micro-batch of the update: DeepSpeed steps at the accumulation boundary
        loss, _ = stage.loss(engine, batch, sched, {k: float(v) * world for k, v in stage.counts(batch).items()})
        engine.backward(loss * 0)
        engine.step()
    out["after_zero_grad_step"] = gathered(engine)
    out["zero_step_lr"] = sched["lr"]
    del engine, optimizer

    # the same model built again from the seed, trained for len(steps) updates
    state = build(cfg, stage, ds)
    engine, optimizer = state.engine, state.optimizer
    losses = []
    for step, per_rank in enumerate(steps):
        torch.manual_seed(1000 + step)  # the same random draws (dVAE gumbel noise) as the reference
        if step == stage.moments_reset_step:  # as train.py does (the dVAE warm start's end)
            reset_moments(optimizer)
        metrics = train_update(engine, optimizer, stage, per_rank[rank], stage.schedules(step))
        losses.append(metrics["loss"])
    out["losses"] = losses
    out["final"] = gathered(engine)
    if rank == 0:
        torch.save(out, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
