"""Training entry point for every stage: config -> model -> deepspeed.initialize -> loop.

    deepspeed --num_gpus 2 megadalle/train.py --deepspeed_config ds_configs/zero3_cpu.json \
        --config megadalle/configs/dvae_debug.toml [--train.steps=100 ...]
    torchrun --nproc_per_node 2 megadalle/train.py --config ... ;  python megadalle/train.py --config ...

Writes into `<job.run_root>/<job.name>/`: config.toml (resolved), ds_config.json (filled), metrics.jsonl
(one JSON line per step, rank 0), images/ (evaluation grids) and checkpoints/.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadalle.config import ConfigError, JobConfig, load_config, write_resolved
from megadalle.data.stream import StreamStateMismatchError
from megadalle.engine import distributed
from megadalle.engine.adam16 import make_optimizer
from megadalle.engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_checkpoint,
    older_complete,
    prepare_resume,
)
from megadalle.engine.denormals import flush_denormals
from megadalle.engine.distributed import barrier, init_distributed, is_main, shutdown, sum_over_ranks, world_size
from megadalle.engine.distributed import rank as global_rank
from megadalle.engine.ds_config import grad_scaler_mode, load_ds_config
from megadalle.engine.ema import ShardedEMA
from megadalle.engine.heartbeat import Heartbeat
from megadalle.engine.metrics import MetricsLogger, RankStatus, log, setup_logging
from megadalle.engine.optim import reset_moments
from megadalle.engine.preemption import StopSignals
from megadalle.engine.progress import Progress
from megadalle.engine.train_state import DataPosition, PowerSGDState, TrainState
from megadalle.engine.wrap import apply_wrappers, autocast, eager_module_hooks
from megadalle.stages import make_stage
from megadalle.stages.base import Stage


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher arguments (deepspeed/torchrun add --local_rank); everything else goes to load_config."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--deepspeed_config", default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    p.add_argument("--deepspeed", action="store_true")
    return p.parse_known_args(argv)


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(cfg: JobConfig, stage: Stage, ds: dict[str, Any]) -> TrainState:
    """The model of `stage` (under zero.Init for ZeRO-3, from the job's seed: identical on every rank and, on CPU,
    equal to a plain PyTorch build with the same seed; zero.Init on a GPU draws from the GPU's generator), the
    training wrappers, AdamW over the stage's groups, DeepSpeed, the EMA; with every stateful part a checkpoint
    holds (engine/train_state.py)."""
    import deepspeed

    torch.manual_seed(cfg.job.seed)
    zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    groups = _powersgd_groups(cfg, zero3)  # (topology, node group, cross group) or None
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero3, data_parallel_group=groups and groups[1]):
        model = stage.build_model()
    apply_wrappers(model, cfg, grad_scaler_mode(cfg, ds))
    o = cfg.optim
    optimizer = make_optimizer(stage.param_groups(model), o.moments, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    state = TrainState(engine, optimizer, stage.lr_schedule, DataPosition(stage))
    if cfg.train.compile:
        eager_module_hooks(engine.module)  # DeepSpeed's ZeRO-3 hooks, installed just now, stay out of the graphs
    if o.ema_decay > 0:
        state.ema = ShardedEMA(engine.module, o.ema_decay)
    if getattr(model, "grad_scaler", None) is not None:  # engine/wrap.py put it there
        from megadalle.engine import ds_grad_scaler

        state.grad_scaler = model.grad_scaler
        ds_grad_scaler.install(engine.optimizer, engine.module, model.grad_scaler)
    if groups is not None:
        from megadalle.engine import ds_powersgd

        p, topo = cfg.powersgd, groups[0]
        psgd = ds_powersgd.install(engine.optimizer, engine.module, *groups, p.rank, p.start_iter, p.eps, cfg.job.seed)
        state.powersgd = PowerSGDState(psgd, topo.node, topo.local, topo.gpus_per_node)
    return state


def _powersgd_groups(cfg: JobConfig, zero3: bool) -> tuple[Any, Any, Any] | None:
    """With powersgd.enabled: the node groups of parallel.gpus_per_node ranks (ZeRO-3 shards inside them) and the
    cross groups PowerSGD averages over (engine/ds_powersgd.py)."""
    if not cfg.powersgd.enabled:
        return None
    from megadalle.engine.powersgd import Topology, new_groups

    if not zero3:
        raise ConfigError("powersgd.enabled needs ZeRO-3 (zero_optimization.stage = 3): it shards parameters inside "
                          "node groups and compresses the averaging between them")  # fmt: skip
    try:
        topo = Topology(world_size(), cfg.parallel.gpus_per_node, global_rank())
    except ValueError as e:
        raise ConfigError(f"parallel.gpus_per_node: {e}") from None
    if cfg.powersgd.rank % topo.gpus_per_node:
        raise ConfigError(f"powersgd.rank {cfg.powersgd.rank} is not a multiple of parallel.gpus_per_node "
                          f"{topo.gpus_per_node} (each GPU's shards get rank / gpus_per_node)")  # fmt: skip
    if topo.n_nodes == 1:
        log.warning("powersgd.enabled with one node group: nothing to average between node groups")
    return (topo, *new_groups(topo))


def _to(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested tuple/list) batch moved to `device`; anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


SKIPPED = "__skipped_samples__"


def _untimed(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def train_update(
    engine,
    optimizer,
    stage: Stage,
    micro_batches: list,
    sched: dict[str, float],
    flags: dict[str, float] | None = None,
    phase: Callable[[str], contextlib.AbstractContextManager] = _untimed,
) -> dict[str, float]:
    """One optimizer update over this rank's micro-batches; returns the global-batch statistics (summed shares),
    and `flags` summed over ranks (one all-reduce with the statistics, after the update). `phase(name)` brackets
    its parts for tools/profile_step.py: "reduce" (the counts and statistics all-reduces), "forward", "backward",
    "step" (DeepSpeed's: gradient reduction, clipping, the optimizer).

    Each micro-batch's loss is its share of the global-batch objective (normalised by totals over every
    micro-batch and rank, stages/base.py). DeepSpeed averages gradients over the accumulation steps and over
    the ranks, so the backward pass scales the share by both counts to undo that average."""
    for group in optimizer.param_groups:
        group["lr"] = sched["lr"]
    local: dict[str, Any] = {}
    for batch in micro_batches:
        for k, v in stage.counts(batch).items():
            local[k] = local.get(k, 0) + v
    with phase("reduce"):
        totals = sum_over_ranks({**local, SKIPPED: stage.skips.total})  # the data skips ride on the same all-reduce
    skipped = totals.pop(SKIPPED)
    scale = len(micro_batches) * world_size()
    stats: dict[str, torch.Tensor] = {}
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        with phase("forward"):
            loss, s = stage.loss(engine, _to(batch, engine.device), sched, totals)
        with phase("backward"):
            engine.backward(loss * scale)
        for k, v in s.items():
            stats[k] = stats.get(k, 0) + v
        if i == len(micro_batches) - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = _local_grad_norm(engine)  # ZeRO-0 computes none unless it clips
        with phase("step"):
            engine.step()
    with phase("reduce"):
        metrics = sum_over_ranks({**stats, **(flags or {})})
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["skipped_samples"] = int(skipped)  # samples every rank's stream skipped so far (data/stream.py), summed
    return metrics


def train(cfg: JobConfig, rank: int, world: int, stop: StopSignals | None = None) -> dict[str, float]:
    """The training loop of `cfg` on this rank; returns the last evaluation's metrics. SIGUSR1 and SIGTERM (`stop`)
    end it after the current update with a checkpoint (engine/preemption.py)."""
    stop = stop or StopSignals(cfg.checkpoint.requeue_on)
    run_dir = cfg.run_dir
    ds = load_ds_config(cfg, world)
    accum = cfg.grad_accum_steps(world)
    stage = make_stage(cfg)
    ckpt_root = run_dir / "checkpoints"
    outputs = [run_dir / name for name in (cfg.logging.json_file, "config.toml", "ds_config.json", "images",
                                           "tensorboard", "status")]  # fmt: skip
    resume = prepare_resume(ckpt_root, cfg.checkpoint, outputs)
    if rank == 0:
        write_resolved(cfg, run_dir)
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=1) + "\n")
    random.seed(cfg.job.seed + rank)
    np.random.seed(cfg.job.seed + rank)

    state = build(cfg, stage, ds)
    engine, optimizer, ema, o = state.engine, state.optimizer, state.ema, cfg.optim

    step = 0
    if resume is not None:
        step, resume = _resume(state, ckpt_root, resume, cfg)
    loader_state = state.data.loaded  # None: the stream starts from its beginning (load_checkpoint warned)

    logger = MetricsLogger(
        run_dir / cfg.logging.json_file if rank == 0 else None,
        cfg.train.log_every,
        stage.readable,
        append=step > 0,
        tensorboard=run_dir / "tensorboard" if cfg.logging.tensorboard else None,
    )
    numel = {p: getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()}
    n_params = sum(numel.values())
    for g in stage.param_groups(engine.module):
        log.info(
            f"optimizer group {g['name']}: {len(g['params'])} tensors, "
            f"{sum(numel[p] for p in g['params']) / 1e6:.2f}M parameters, weight decay {g['weight_decay']}"
        )
    t = cfg.train
    log.info(
        f"stage {cfg.job.stage}: {n_params / 1e6:.2f}M parameters, world {world}, "
        f"ZeRO {engine.zero_optimization_stage()}, precision {t.precision}, "
        f"micro-batch {t.micro_batch_size} x accum {accum} x world {world}"
        + (", autocast bf16" if getattr(engine.module, "autocast_dtype", None) else "")
        + (", compiled" if t.compile else "")
    )
    try:
        batches = stage.batches(rank, loader_state)
    except StreamStateMismatchError as e:  # a position saved by another world size or worker count
        log.warning(f"the data position in the checkpoint does not apply ({e}): the stream restarts")
        batches = stage.batches(rank)
    start_step = step
    samples_per_step = t.micro_batch_size * accum * world
    last_eval: dict[str, float] = {}
    status = RankStatus(run_dir / "status", rank)
    status.update(step, "started")
    psgd = state.powersgd.psgd if state.powersgd is not None else None
    psgd_sent = psgd.comm.bytes_sent if psgd is not None else 0
    saved = -1  # the step of the last checkpoint written
    ckpt = Checkpointer(ckpt_root, cfg)
    signals: list[str] = []
    first_dt = 0.0

    with Progress(cfg.logging.progress, t.steps, start_step, f"{cfg.job.stage} {cfg.job.name}", rank) as bar:
        while step < t.steps:
            t0 = time.time()
            sched = stage.schedules(step)
            if step == stage.moments_reset_step:
                log.info(f"step {step}: optimizer moments reset ({reset_moments(optimizer)} tensors had state)")
            micro = [next(batches) for _ in range(accum)]
            metrics = train_update(engine, optimizer, stage, micro, sched, flags={**stop.flags(), **ckpt.flags()})
            signals = stop.agreed(metrics)
            ckpt.observe(metrics)  # a checkpoint written in the background is completed once every rank is done
            stage.lr_schedule.observe(step, metrics["loss"])
            step += 1
            if ema is not None and step % o.ema_every == 0:
                ema.update()
            dt = time.time() - t0
            if t.compile and step - start_step <= 2:  # the first update compiles; the second runs compiled
                first_dt = dt if step - start_step == 1 else first_dt
                if step - start_step == 2:
                    log.info(f"train.compile: the first update took {first_dt:.1f} s, the second {dt:.2f} s: "
                             f"about {first_dt - dt:.1f} s of compilation")  # fmt: skip
            metrics.update(sched)
            metrics.update(stage.throughput(samples_per_step / dt))
            if cfg.logging.peak_tflops and "tflops" in metrics:  # model FLOPs over what the job's accelerators peak at
                metrics["mfu"] = metrics["tflops"] / (world * cfg.logging.peak_tflops)
            metrics.update(
                images_per_s=samples_per_step / dt,
                step_time_s=dt,
                skipped_steps=int(getattr(engine, "skipped_steps", 0)),  # fp16 overflows: update not applied
                memory_mb=_memory_mb(),
            )
            if psgd is not None:  # what this rank sent across node groups this update, and whether compressed
                metrics.update(powersgd_mb_sent=(psgd.comm.bytes_sent - psgd_sent) / 2**20,
                               powersgd_compressing=int(psgd.updates > cfg.powersgd.start_iter))  # fmt: skip
                psgd_sent = psgd.comm.bytes_sent
            scaler = state.grad_scaler
            if scaler is not None:
                metrics.update(scaler.metrics(per_block=step % t.log_every == 0 or step in (start_step + 1, t.steps)))
            if not np.isfinite(metrics["loss"]):
                log.warning(f"step {step}: non-finite loss {metrics['loss']}")
            logger.log(step, metrics, force=step in (start_step + 1, t.steps) or bool(signals))
            bar.update(step, metrics["loss"])
            status.update(step)
            if signals and step < t.steps:  # on the last update the run simply ends, evaluated and not requeued
                say = log.warning if rank == 0 else log.info
                say(f"SIG{' and SIG'.join(signals)} received: stopping after update {step} with a checkpoint")
                break
            signals = []
            if t.eval_every and step % t.eval_every == 0:
                status.update(step, "evaluating")
                last_eval = _evaluate(stage, engine, ema, step, run_dir, logger)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                status.update(step, "checkpointing")
                ckpt.save(step, state, final=step == t.steps)
                log.info(f"step {step}: checkpoint {'queued' if ckpt.pending else 'written'}, the loop held "
                         f"{ckpt.stall_s:.2f} s")  # fmt: skip
                saved = step
            status.update(step, "training")

    ckpt.wait()  # one written in the background: complete before the run goes on to its end
    if step > start_step and saved != step:
        status.update(step, "checkpointing")
        ckpt.save(step, state, final=True)
    if signals:  # no evaluation: the time before the job is killed is for the checkpoint
        logger.log(step, {"reason": "signal " + " ".join(signals)}, kind="stop")
        status.update(step, "stopped")
        stop.stopped_by = signals
    else:
        if t.eval_every and step % t.eval_every != 0:  # eval_every = 0: never evaluate
            status.update(step, "evaluating")
            last_eval = _evaluate(stage, engine, ema, step, run_dir, logger)
        logger.log(step, {"reason": "done"}, kind="end")
        status.update(step, "done")
    logger.close()
    status.close()
    del engine, optimizer  # before the process group goes: the 2-process gloo exit abort (PLATFORM.md)
    gc.collect()
    return last_eval


def _resume(state: TrainState, ckpt_root: Path, resume: Path, cfg: JobConfig) -> tuple[int, Path]:
    """Collective: the run's state from checkpoint `resume` (or, for resume = auto, the newest older complete one
    when it cannot be loaded): DeepSpeed's engine and every part of `state` (engine/train_state.py). Returns
    (step, the folder used); this rank's data position waits in `state.data.loaded`."""
    while True:
        try:
            step = load_checkpoint(resume, state)
            break
        except CheckpointError as e:
            fallback = older_complete(ckpt_root, resume) if cfg.checkpoint.resume in ("auto", "latest") else None
            if fallback is None:
                raise
            if is_main():  # out of the way: rotation must not keep it over the checkpoints saved after the fallback
                os.replace(resume, resume.with_name(f"{resume.name}.unloadable-{time.strftime('%Y%m%d-%H%M%S')}"))
            barrier()
            log.warning(f"{e}; moved it aside and fell back to the previous complete checkpoint {fallback}")
            resume = fallback
    if state.grad_scaler is not None:
        from megadalle.engine import ds_grad_scaler

        ds_grad_scaler.sync(state.engine.optimizer)  # DeepSpeed restored its own (saved) loss scaler
    log.info(f"resumed from {resume} at step {step}")
    return step, resume


def _evaluate(stage: Stage, engine, ema: ShardedEMA | None, step: int, run_dir: Path, logger: MetricsLogger) -> dict:
    """Collective: the EMA weights (or the live ones) evaluated on the training engine by every rank, each on its
    share of the batches (stages/base.py): the EMA swapped into the parameters' own storage (under ZeRO-3 each rank
    swaps its shards; no rank gathers the model) and the live values back bit for bit afterwards. The module runs
    as the training forward does: in training precision, under the engine's autocast where it has one and under
    train.autocast's (engine/wrap.py). Every rank returns the metrics; rank 0 logs them."""
    from deepspeed.runtime.torch_autocast import autocast_if_enabled

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    weights = ema.swapped_in(engine.optimizer if zero3 else None) if ema is not None else contextlib.nullcontext()
    was_training = module.training
    with weights, torch.no_grad(), autocast_if_enabled(engine), autocast(module, engine.device):
        module.eval()
        try:
            metrics = stage.evaluate(module, step, run_dir / "images", device=engine.device)
        finally:
            module.train(was_training)
    if is_main():
        logger.log(step, metrics, kind="eval")
    return metrics


def _local_grad_norm(engine) -> float:
    """Global gradient norm where every rank holds whole, already averaged gradients (ZeRO-0)."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # before the first torch operation starts the thread pool
    stop = StopSignals()  # first: SIGUSR1 during the start-up must not end the process (its default action)
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(rest)
        if args.deepspeed_config:
            cfg.parallel.deepspeed_config = args.deepspeed_config
        stop.requeue_on = tuple(cfg.checkpoint.requeue_on)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    p = cfg.parallel
    rank, world = init_distributed(p.collective_timeout_s)
    setup_logging(cfg.logging.level, rank, cfg.run_dir / "logs")
    log.info(f"rank {rank} of {world} (launcher {distributed.LAUNCHER}, local rank {os.environ['LOCAL_RANK']}, "
             f"rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, collective timeout "
             f"{p.collective_timeout_s:.0f} s, heartbeat timeout {p.heartbeat_timeout_s:.0f} s)")  # fmt: skip
    heartbeat = Heartbeat(rank, world, p.heartbeat_timeout_s).start() if world > 1 and p.heartbeat_timeout_s else None
    try:
        train(cfg, rank, world, stop)
    except (ConfigError, FileNotFoundError) as e:
        log.error(f"{type(e).__name__}: {e}")
        if heartbeat is not None:
            heartbeat.stop()
        shutdown(barrier=False)  # the other ranks may be gone already
        return 2
    except Exception as e:  # often a collective that failed because another rank died: name it if one did
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})  # the launcher's SIGTERM would
        lost = heartbeat.silent() if heartbeat is not None else []  # interrupt the store reads that find it
        why = f"; not responding: {', '.join(lost)}" if lost else ""
        log.error(f"rank {rank} failed: {type(e).__name__}: {e}{why}", exc_info=True)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)  # no teardown: collectives with a dead peer may hang, and the launcher ends the other ranks
    if heartbeat is not None:
        heartbeat.closing()  # still beating through the last barrier; rank 0's store may go away after it
    barrier()
    if heartbeat is not None:
        heartbeat.stop()
    shutdown(barrier=False)
    if rank == 0 and stop.stopped_by:
        stop.requeue(stop.stopped_by)
    return 0


if __name__ == "__main__":
    sys.exit(main())
