#!/usr/bin/env python
"""Training throughput of a prior flavor on one device, next to the planner's estimate (issue 16's GPU check).

    python tools/bench_train_gpu.py [--flavor 1p3b] [--steps 20] [--warmup 5] [--micro-batch 4] [--peak-tflops 989]
        [--precision bf16] [--json OUT.json]

Plain PyTorch, no DeepSpeed (the GPU image has torch and triton only): the prior with its own attention kernels
(`auto`: Triton on a GPU), activation checkpointing, autocast in the training precision, AdamW with fp32 moments,
random tokens. Times --steps updates after --warmup, and prints tokens/s, model TFLOP/s (megadalle's
`flops_per_sample`, without recomputation) and MFU, beside megadalle/engine/planner.py's estimate for one GPU
with the same settings. On the CPU it runs as a smoke test (--flavor debug --device cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def _untimed(name: str) -> Iterator[None]:
    yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="1p3b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak in that precision (H200)")
    ap.add_argument("--memory-gib", type=float, default=141.0, help="the device's memory, for the planner")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--profile", type=int, default=0, help="then N updates split into forward, backward and step, "
                    "and torch.profiler's top operators of one more (0: none)")  # fmt: skip
    a = ap.parse_args(argv)
    from megadalle.engine.planner import Cluster, Setting, plan
    from megadalle.engine.wrap import apply_activation_checkpointing
    from megadalle.models.sparsity import attended_pairs, layer_kinds
    from megadalle.models.transformer import FLAVORS, DallePrior, flops_per_sample

    args = FLAVORS[a.flavor]
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = DallePrior(args, "auto").to(device)
    apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045, fused=device.type == "cuda"
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=a.precision == "fp16")
    b = a.micro_batch
    text = torch.randint(1, args.text_vocab, (b, args.text_len), device=device)
    image = torch.randint(0, args.image_vocab, (b, args.grid * args.grid), device=device)

    def step(phase=_untimed) -> float:
        with phase("forward"), torch.autocast(device.type, dtype=dtype, enabled=a.precision != "fp32"):
            out = model(text, image)
            loss = (out.text_nll / 8 + out.image_nll * 7 / 8) / (b * args.seq_len)
        with phase("backward"):
            scaler.scale(loss).backward()
        with phase("step"):
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(a.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    pairs = attended_pairs(layer_kinds(args.n_layers), args.text_len, args.grid, args.grid, args.conv_kernel)
    tflops = flops_per_sample(args, pairs) * b / dt / 1e12
    estimate = plan(Cluster(1, 1, a.memory_gib, a.peak_tflops, 1000.0, 1000.0),
                    Setting(flavor=a.flavor, micro_batch=b, global_batch=b, precision=a.precision,
                            grad_scaler="global", powersgd_rank=0))  # fmt: skip
    result = {
        "flavor": a.flavor, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": a.precision, "micro_batch": b, "step_s": dt, "tokens_per_s": b * args.seq_len / dt,
        "model_tflops": tflops, "mfu": tflops / a.peak_tflops, "loss": loss,
        "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "planner": {k: estimate[k] for k in ("step_s", "tokens_per_s", "mfu", "total_bytes")},
    }  # fmt: skip
    if a.profile:  # where an update's time goes (megadalle/profiling.py's phases, synchronised), and the top operators
        from megadalle.profiling import PhaseTimer

        timer = PhaseTimer(sync=device.type == "cuda")
        for _ in range(a.profile):
            step(timer)
        result["phases_ms"] = {k: v * 1e3 / a.profile for k, v in timer.seconds.items()}
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        result["top_ops"] = prof.key_averages().table(sort_by=sort, row_limit=12)
        total = sum(result["phases_ms"].values())
        print("  ".join(f"{k} {v:.1f} ms ({v / total:.0%})" for k, v in result["phases_ms"].items()))
        print(result["top_ops"])
    print(f"{a.flavor} on {result['device']} ({a.precision}, micro-batch {b}): {result['step_s']:.3f} s/update, "
          f"{result['tokens_per_s']:,.0f} tokens/s, {tflops:.1f} model TFLOP/s, MFU {result['mfu']:.1%}; planner: "
          f"{estimate['step_s']:.3f} s, {estimate['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {estimate['mfu']:.1%}")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
