"""Worker for tests/engine/test_world_size_invariance.py: one global batch split over this run's ranks, through
train.py's own build and update, for each of several configurations in turn (one process group).

    torchrun --nproc_per_node W tests/engine/invariance_worker.py BATCHES.pt OUT.pt RUNS.json

BATCHES.pt: {"steps": [[micro-batch, ...] for each update]}: the global batch's micro-batches in order; rank r
takes micro-batches [r * k, (r + 1) * k), k = len / W (its accumulation count). RUNS.json: [{"name", "args",
"log2_offset"}]: config arguments, and a number added to every log2 gradient scale after the build (to provoke
overflows). Rank 0 writes OUT.pt: for each run, the global loss of each update, the scaler's state after each
update, DeepSpeed's skipped steps, and per update and resblock the largest |gradient| entering the branch (at its
output: the fp16 activation gradient, max over micro-batches and ranks), the sum of its squares (over
micro-batches and ranks) and its dtype; the initial and final parameters; how many shards PowerSGD compressed and
its update count; the dtypes Adam's first moments are stored in.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from megadalle.config import load_config
from megadalle.engine.denormals import flush_denormals
from megadalle.engine.distributed import init_distributed
from megadalle.engine.ds_config import load_ds_config
from megadalle.engine.grad_scaler import resblocks
from megadalle.stages import make_stage
from megadalle.train import build, train_update


def gathered(engine) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def measure(model) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    """Hooks on the gradient entering each resblock's branch; returns (amax, sum of squares) accumulators
    (n_blocks,) float64 and the dtypes seen."""
    blocks = resblocks(model)
    amax = torch.zeros(len(blocks), dtype=torch.float64)
    sumsq = torch.zeros(len(blocks), dtype=torch.float64)
    dtypes: dict[int, str] = {}

    def record(i: int, g: torch.Tensor) -> None:
        g64 = g.detach().double()
        amax[i] = max(float(amax[i]), float(g64.abs().max()))
        sumsq[i] += float(g64.square().sum())
        dtypes[i] = str(g.dtype)

    for i, block in enumerate(blocks):
        branch = block.branch

        def measured(x, branch=branch, i=i):
            out = branch(x)
            if out.requires_grad:
                out.register_hook(lambda g: record(i, g))
            return out

        block.branch = measured
    return amax, sumsq, dtypes


def run(spec: dict, steps: list, rank: int, world: int) -> dict:
    cfg = load_config(spec["args"])
    ds = load_ds_config(cfg, world)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every parameter
    stage = make_stage(cfg)
    state = build(cfg, stage, ds)
    engine, optimizer = state.engine, state.optimizer
    scaler = engine.module.grad_scaler
    scaler.log2_scales += spec.get("log2_offset", 0.0)
    from megadalle.engine import ds_grad_scaler

    ds_grad_scaler.sync(engine.optimizer)  # DeepSpeed's loss scale follows the offset one
    amax, sumsq, dtypes = measure(engine.module)
    out: dict = {"losses": [], "scaler": [], "skipped": [], "amax": [], "sumsq": [], "init": gathered(engine)}
    for step, micro in enumerate(steps):
        k = len(micro) // world
        amax.zero_()
        sumsq.zero_()
        metrics = train_update(engine, optimizer, stage, micro[rank * k : (rank + 1) * k], stage.schedules(step))
        a, s = amax.clone(), sumsq.clone()
        dist.all_reduce(a, op=dist.ReduceOp.MAX)
        dist.all_reduce(s)
        out["losses"].append(metrics["loss"])
        out["scaler"].append(scaler.state_dict())
        out["skipped"].append(int(engine.skipped_steps))
        out["amax"].append(a)
        out["sumsq"].append(s)
    out["dtypes"] = sorted(set(dtypes.values()))
    psgd = state.powersgd.psgd if state.powersgd is not None else None  # what PowerSGD compressed, how often
    out["powersgd"] = None if psgd is None else {"compressed": len(psgd.compressed), "updates": psgd.updates}
    inner = engine.optimizer.optimizer  # the client optimizer under ZeRO-3: its first moments' storage
    out["moments"] = sorted({str(s["exp_avg"].dtype) for s in inner.state.values() if "exp_avg" in s})
    out["final"] = gathered(engine)
    del engine, optimizer
    return out


def main() -> None:
    flush_denormals()  # before the first torch operation starts the thread pool
    batches_path, out_path, runs_path = sys.argv[1:4]
    rank, world = init_distributed()
    steps = torch.load(batches_path)["steps"]
    results = {spec["name"]: run(spec, steps, rank, world) for spec in json.loads(open(runs_path).read())}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
