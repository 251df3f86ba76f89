"""Training entry point for every stage: config -> model -> deepspeed.initialize -> loop.

    deepspeed --num_gpus 2 megadalle/train.py --deepspeed_config ds_configs/zero3_cpu.json \
        --config megadalle/configs/dvae_debug.toml [--train.steps=100 ...]
    torchrun --nproc_per_node 2 megadalle/train.py --config ... ;  python megadalle/train.py --config ...

Writes into `<job.run_root>/<job.name>/`: config.toml (resolved), ds_config.json (filled), metrics.jsonl
(one JSON line per step, rank 0), images/ (evaluation grids) and checkpoints/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megadalle.config import ConfigError, JobConfig, load_config, write_resolved
from megadalle.engine.checkpoint import gathered_state, load_checkpoint, resolve_resume, save_checkpoint
from megadalle.engine.ds_config import load_ds_config
from megadalle.engine.ema import ShardedEMA
from megadalle.engine.metrics import MetricsLogger, log, setup_logging


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher arguments (deepspeed/torchrun add --local_rank); everything else goes to load_config."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--deepspeed_config", default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    p.add_argument("--deepspeed", action="store_true")
    return p.parse_known_args(argv)


def init_distributed() -> tuple[int, int]:
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:  # a plain `python train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_stage(cfg: JobConfig):
    if cfg.job.stage == "dvae":
        from megadalle.stages.dvae import DVAEStage

        return DVAEStage(cfg)
    if cfg.job.stage == "prior":
        from megadalle.stages.prior import PriorStage

        return PriorStage(cfg)
    if cfg.job.stage == "clip":
        from megadalle.stages.clip import ClipStage

        return ClipStage(cfg)
    raise ConfigError(f"job.stage={cfg.job.stage!r} is not one of dvae, prior, clip")


def _mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.stack([values[k].float().reshape(()) for k in keys])
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t)}


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg: JobConfig, rank: int, world: int) -> dict[str, float]:
    import deepspeed

    run_dir = cfg.run_dir
    ds = load_ds_config(cfg, world)
    if rank == 0:
        write_resolved(cfg, run_dir)
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=1) + "\n")
    torch.manual_seed(cfg.job.seed)  # identical initial weights on every rank
    random.seed(cfg.job.seed + rank)
    np.random.seed(cfg.job.seed + rank)

    stage = make_stage(cfg)
    zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero3):
        model = stage.build_model()
    o = cfg.optim
    optimizer = torch.optim.AdamW(stage.param_groups(model), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    ema = ShardedEMA(engine.module, o.ema_decay) if o.ema_decay > 0 else None

    ckpt_root = run_dir / "checkpoints"
    step = 0
    resume = resolve_resume(ckpt_root, cfg.checkpoint.resume)
    if resume is not None:
        step = load_checkpoint(engine, resume, ema)
        log.info(f"resumed from {resume} at step {step}")

    logger = MetricsLogger(
        run_dir / cfg.logging.json_file if rank == 0 else None, cfg.train.log_every, stage.readable, append=step > 0
    )
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    t = cfg.train
    log.info(
        f"stage {cfg.job.stage}: {n_params / 1e6:.2f}M parameters, world {world}, "
        f"ZeRO {engine.zero_optimization_stage()}, precision {t.precision}, "
        f"micro-batch {t.micro_batch_size} x accum {t.grad_accum_steps}"
    )
    batches = stage.batches(rank)
    start_step = step
    images_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    last_eval: dict[str, float] = {}

    while step < cfg.train.steps:
        t0 = time.time()
        sched = stage.schedules(step)
        for group in optimizer.param_groups:
            group["lr"] = sched["lr"]
        stats: dict[str, torch.Tensor] = {}
        grad_norm = None
        for micro in range(cfg.train.grad_accum_steps):
            x = next(batches)
            for k, v in stage.micro_step(engine, x, sched).items():
                stats[k] = stats.get(k, 0) + v / cfg.train.grad_accum_steps
            if micro == cfg.train.grad_accum_steps - 1 and engine.zero_optimization_stage() == 0:
                grad_norm = _local_grad_norm(engine)  # ZeRO-0 computes none unless it clips
            engine.step()
        step += 1
        if ema is not None and step % o.ema_every == 0:
            ema.update()
        metrics = _mean_over_ranks(stats)
        dt = time.time() - t0
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        metrics.update(sched)
        if hasattr(stage, "throughput"):
            metrics.update(stage.throughput(images_per_step / dt))
        metrics.update(
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            images_per_s=images_per_step / dt,
            step_time_s=dt,
            skipped_samples=stage.skips.total,
            skipped_steps=int(getattr(engine, "skipped_steps", 0)),  # fp16 overflows: update not applied
            memory_mb=_memory_mb(),
        )
        if not np.isfinite(metrics["loss"]):
            log.warning(f"step {step}: non-finite loss {metrics['loss']}")
        logger.log(step, metrics, force=step in (start_step + 1, cfg.train.steps))  # first and last always shown
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            last_eval = _evaluate(stage, engine, ema, step, run_dir, logger)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save_checkpoint(engine, ckpt_root, step, ema, cfg, cfg.checkpoint.keep)

    if not (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
        save_checkpoint(engine, ckpt_root, step, ema, cfg, cfg.checkpoint.keep)
    if cfg.train.eval_every and step % cfg.train.eval_every != 0:  # eval_every = 0: never evaluate
        last_eval = _evaluate(stage, engine, ema, step, run_dir, logger)
    logger.close()
    del engine, optimizer
    gc.collect()
    return last_eval


def _evaluate(stage, engine, ema: ShardedEMA | None, step: int, run_dir: Path, logger: MetricsLogger) -> dict:
    """Collective: EMA weights (or the live ones) gathered on every rank, evaluated on rank 0."""
    import torch.distributed as dist

    state = ema.full_state_dict() if ema is not None else gathered_state(engine)
    metrics = stage.evaluate(state, step, run_dir / "images") if dist.get_rank() == 0 else {}
    dist.barrier()
    if dist.get_rank() == 0:
        logger.log(step, metrics, kind="eval")
    return metrics


def _local_grad_norm(engine) -> float:
    """Global gradient norm where every rank holds whole, already averaged gradients (ZeRO-0)."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(rest)
        if args.deepspeed_config:
            cfg.parallel.deepspeed_config = args.deepspeed_config
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    rank, world = init_distributed()
    setup_logging(cfg.logging.level, rank)
    import torch.distributed as dist

    try:
        train(cfg, rank, world)
    except (ConfigError, FileNotFoundError) as e:
        log.error(f"{type(e).__name__}: {e}")
        dist.destroy_process_group()
        return 2
    dist.barrier()
    dist.destroy_process_group()  # a clean exit: gloo otherwise may abort at interpreter shutdown
    return 0


if __name__ == "__main__":
    sys.exit(main())
