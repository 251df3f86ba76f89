#!/usr/bin/env python
"""What training a prior flavor takes on a cluster: memory per GPU, communication and time per update, MFU, fit.

    python tools/plan.py                                  # the paper's run and an H200 cluster, side by side
    python tools/plan.py --preset paper --nodes 64        # a preset with any value changed
    python tools/plan.py --flavor 1p3b --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80 --peak-tflops 312 \\
        --intra-gbps 300 --inter-gbps 25 --precision bf16 --powersgd-rank 0 --global-batch 512 [--json]

The estimates and their assumptions are in megadalle/engine/planner.py; the model-state bytes are checked
against DeepSpeed's tensors on 2 and 4 ranks and against its estimator (tests/engine/test_planner.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megadalle.engine.planner import PRESETS, Cluster, GiB, Setting, plan  # noqa: E402


def _row(label: str, values: list[str]) -> str:
    return f"{label:<34}" + "".join(f"{v:>22}" for v in values)


def table(plans: list[dict], names: list[str]) -> str:
    gib = lambda key: [f"{p[key] / GiB:.2f} GiB" for p in plans]  # noqa: E731
    lines = [_row("", names)]
    lines.append(_row("flavor (parameters)", [f"{p['flavor']} ({p['parameters'] / 1e9:.2f}B)" for p in plans]))
    c = [p["cluster"] for p in plans]
    lines.append(_row("GPUs (nodes x per node)", [f"{x['nodes'] * x['gpus_per_node']} ({x['nodes']} x "
                                                  f"{x['gpus_per_node']})" for x in c]))  # fmt: skip
    st = [p["setting"] for p in plans]
    lines.append(_row("precision, moments", [f"{x['precision']}, {x['moments']}" for x in st]))
    lines.append(_row("ZeRO-3 shard group, accumulation", [f"{p['shard_group']}, x{p['grad_accum']}" for p in plans]))
    lines.append(
        _row("PowerSGD rank", [str(x["powersgd_rank"]) if p["powersgd"] else "off" for x, p in zip(st, plans)])
    )
    fp16 = ["-"] * len(plans)  # the per-resblock scales' start (any world size) and the fp16 reduce's pre-division
    for i, p in enumerate(plans):
        if "fp16_reduce_predivide" in p:
            first = "global" if p["grad_scale_log2_init"] is None else f"2^{p['grad_scale_log2_init']:g}"
            n = p["fp16_reduce_predivide"]
            fp16[i] = f"{first}, /{n} ({math.log2(n):.0f} bits)"
    lines.append(_row("fp16 scale, reduce /", fp16))
    lines.append("memory per GPU")
    for key, label in (("params_bytes", "  parameters"), ("grads_bytes", "  gradients"),
                       ("optimizer_bytes", "  optimizer (master, moments)"), ("ema_bytes", "  EMA (fp32 shard)"),
                       ("powersgd_bytes", "  PowerSGD buffers"),
                       ("activation_bytes", "  activations"), ("buffer_bytes", "  work buffers"),
                       ("total_bytes", "  total")):  # fmt: skip
        lines.append(_row(label, gib(key)))
    lines.append(_row("  fits (90% of the GPU)", [f"{'yes' if p['fits'] else 'NO'} of {x['gpu_memory_gib']:g} GiB"
                                                 for p, x in zip(plans, c)]))  # fmt: skip
    lines.append("checkpoint and evaluation (within the shards: no rank holds the whole model)")
    files = [f"{p['checkpoint_rank_bytes'] / GiB:.2f} GiB (EMA {p['checkpoint_ema_bytes'] / GiB:.2f})" for p in plans]
    lines.append(_row("  files per rank", files))
    write = [f"{p['checkpoint_write_s']:.3g} s at {x['fs_gbps']:g} GB/s" for p, x in zip(plans, c)]
    lines.append(_row("  write time (all ranks at once)", write))
    lines.append(_row("  all ranks' files", [f"{p['checkpoint_total_bytes'] / 2**40:.2f} TiB" for p in plans]))
    peaks = [f"{p['save_extra_host_bytes'] / GiB:.2f}, {p['resume_extra_host_bytes'] / GiB:.2f} GiB" for p in plans]
    lines.append(_row("  host extra: save, resume", peaks))
    lines.append(_row("  host: async save snapshot", [f"{p['async_host_bytes'] / GiB:.2f} GiB" for p in plans]))
    evals = [f"{p['eval_extra_bytes'] / GiB:.2f} GiB, {'yes' if p['fits_eval'] else 'NO'}" for p in plans]
    lines.append(_row("  evaluation extra (GPU), fits", evals))
    lines.append("per update")
    lines.append(_row("  compute", [f"{p['compute_s']:.3g} s" for p in plans]))
    lines.append(_row("  inside the shard group", [f"{p['intra_node_bytes'] / GiB:.2f} GiB, {p['intra_node_s']:.3g} s"
                                                   for p in plans]))  # fmt: skip
    lines.append(_row("  across node groups", [f"{p['inter_node_bytes'] / GiB:.2f} GiB, {p['inter_node_s']:.3g} s"
                                               for p in plans]))  # fmt: skip
    lines.append(_row("  step time", [f"{p['step_s']:.3g} s" for p in plans]))
    lines.append(_row("tokens/s", [f"{p['tokens_per_s']:,.0f}" for p in plans]))
    lines.append(_row("MFU", [f"{p['mfu']:.1%}" for p in plans]))
    lines.append("stage 2's input: every image through the dVAE encoder (an estimate from its FLOPs)")
    lines.append(_row("  encoder FLOPs per image", [f"{p['encode_flops_per_image'] / 1e9:.0f} GFLOP" for p in plans]))
    enc = [f"{p['encode_s'] / 3600:.3g} h" for p in plans]
    lines.append(_row(f"  {plans[0]['setting']['encode_images'] / 1e6:g}M images on all GPUs", enc))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), action="append",
                    help="start from a preset (repeatable; default: paper and h200)")  # fmt: skip
    for f in fields(Cluster) + fields(Setting):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, type=_bool, default=None, metavar="true|false")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument(flag, type=kind, default=None)
    ap.add_argument("--json", action="store_true", help="print the estimates as JSON")
    a = ap.parse_args(argv)
    names = a.preset or (["paper", "h200"] if not _overrides(a) else ["paper"])
    plans = []
    try:
        for name in names:
            cluster, setting = PRESETS[name]
            cluster = replace(cluster, **{f.name: getattr(a, f.name) for f in fields(Cluster)
                                          if getattr(a, f.name) is not None})  # fmt: skip
            setting = replace(setting, **{f.name: getattr(a, f.name) for f in fields(Setting)
                                          if getattr(a, f.name) is not None})  # fmt: skip
            plans.append(plan(cluster, setting))
    except ValueError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dict(zip(names, plans)), indent=1) if a.json else table(plans, names))
    return 0


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _overrides(a: argparse.Namespace) -> bool:
    return any(getattr(a, f.name) is not None for f in fields(Cluster) + fields(Setting))


if __name__ == "__main__":
    sys.exit(main())
