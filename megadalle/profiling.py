"""Where an update's time goes (tools/profile_step.py): a stage built as train.py builds it, run for `warmup` +
`steps` updates, each split into phases, then one more update under torch.profiler for its top operators.

Phases of an update, in wall seconds on rank 0 (the accelerator synchronised at each boundary while profiling, so
a GPU's queued work is charged to the phase that queued it):
- data: waiting for the micro-batches (`next()` on the stage's stream: reading, decoding, augmenting, collating);
- forward, backward, step: train.py's train_update. DeepSpeed reduces the gradients during the backward pass (its
  hooks; at ZeRO-2/3 the reduce-scatters), so on several ranks "backward" includes that communication; "step" is
  clipping and the optimizer;
- reduce: the all-reduces of the batch counts and of the statistics (on rank 0: with any wait for slower ranks);
- ema: the EMA update (every optim.ema_every updates: time at least that many to see it); log: the metrics line;
- other: the rest of the update's wall time (schedules, host transfers, grad norms, Python between the phases).
train.py's own bookkeeping between updates (checkpoint and stop flags, the status file, the progress bar) is not
run here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megadalle.config import JobConfig

PHASES = ("data", "forward", "backward", "step", "reduce", "ema", "log")


class PhaseTimer:
    """Wall seconds per phase name, summed; `phase(name)` is a context manager that times its block."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.on = True

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            if self.on:
                self.seconds[name] += time.perf_counter() - t0


KINETO_NOISE = ("profiler_start", "profiler_stop")


@contextlib.contextmanager
def _without_kineto_lines() -> Iterator[None]:
    """The process's stderr (file descriptor 2, where C++ libraries write) caught in the block and written back
    without Kineto's "profiler_start" / "profiler_stop" lines: its warnings and errors still show."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        try:
            os.dup2(caught.fileno(), 2)
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [ln for ln in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(noise in ln for noise in KINETO_NOISE)]  # fmt: skip
            sys.stderr.write("".join(kept))


def profile_updates(cfg: JobConfig, steps: int = 5, warmup: int = 2, top: int = 15) -> dict[str, Any]:
    """Time `steps` updates of cfg's stage after `warmup` (collective: every rank runs it; the numbers are rank 0's):
    {"phases": {name: ms per update}, "update_ms", "samples_per_update", "top_ops": torch.profiler's table of one
    more update, "first_update_ms": the first update, compilations and caches included}."""
    from megadalle.engine.distributed import rank, world_size
    from megadalle.engine.ds_config import load_ds_config
    from megadalle.engine.metrics import MetricsLogger
    from megadalle.stages import make_stage
    from megadalle.train import build, train_update

    if steps < 1 or warmup < 0:
        raise ValueError(f"profile: steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    world = world_size()
    ds = load_ds_config(cfg, world)
    accum = cfg.grad_accum_steps(world)
    stage = make_stage(cfg)
    state = build(cfg, stage, ds)
    engine, optimizer, ema = state.engine, state.optimizer, state.ema
    batches = stage.batches(rank())
    timer = PhaseTimer(sync=engine.device.type == "cuda")
    first_ms = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        logger = MetricsLogger(Path(tmp) / "metrics.jsonl", cfg.train.log_every, stage.readable)

        def update(step: int) -> None:
            sched = stage.schedules(step)
            with timer("data"):
                micro = [next(batches) for _ in range(accum)]
            metrics = train_update(engine, optimizer, stage, micro, sched, phase=timer)
            with timer("ema"):
                if ema is not None and (step + 1) % cfg.optim.ema_every == 0:
                    ema.update()
            with timer("log"):
                logger.log(step + 1, {**metrics, **sched})

        total = 0.0
        for step in range(warmup + steps):
            timer.on = step >= warmup
            if timer.sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            update(step)
            if timer.sync:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            first_ms = first_ms or dt * 1e3
            total += dt if timer.on else 0.0
        timer.on = False
        activities = [torch.profiler.ProfilerActivity.CPU]
        if engine.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities)
        with _without_kineto_lines():
            prof.start()
        update(warmup + steps)
        with _without_kineto_lines():
            prof.stop()
        logger.close()
    device, ema_every = str(engine.device), cfg.optim.ema_every if ema is not None else 0
    state = engine = optimizer = ema = batches = None  # gone before the process group (as in train.py: PLATFORM.md)
    gc.collect()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    phases = {name: timer.seconds.get(name, 0.0) * 1e3 / steps for name in PHASES}
    update_ms = total * 1e3 / steps
    phases["other"] = max(0.0, update_ms - sum(phases.values()))
    return {"stage": cfg.job.stage, "name": cfg.job.name, "world": world, "device": device, "ema_every": ema_every,
            "steps": steps, "warmup": warmup, "update_ms": update_ms, "phases": phases,
            "samples_per_update": cfg.train.micro_batch_size * accum * world,
            "first_update_ms": first_ms,
            "top_ops": prof.key_averages().table(sort_by=sort, row_limit=top)}  # fmt: skip


def table(report: dict[str, Any]) -> str:
    """The phases as a readable table: ms per update and share of the update."""
    r = report
    lines = [f"{r['stage']} {r['name']}: {r['update_ms']:.1f} ms per update over {r['steps']} updates (after "
             f"{r['warmup']} warm-up; the first took {r['first_update_ms']:.0f} ms), "
             f"{r['samples_per_update'] / r['update_ms'] * 1e3:.1f} samples/s, world {r['world']}, {r['device']}",
             f"  {'phase':<10}{'ms':>10}{'share':>9}"]  # fmt: skip
    for name, ms in r["phases"].items():
        lines.append(f"  {name:<10}{ms:>10.1f}{ms / r['update_ms']:>9.1%}")
    if r["ema_every"] > r["steps"]:
        lines.append(f"  (the EMA updates every {r['ema_every']} updates: time at least that many to see its cost)")
    return "\n".join(lines)
