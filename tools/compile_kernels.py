#!/usr/bin/env python
"""Compile every Triton kernel configuration that training and tools/gpu_check.sh launch, for sm_90 (H100/H200),
on the CPU with Triton's own compiler; print one line per variant (shared memory, registers, spills) and exit 1
on a compile error or shared memory over Hopper's 232,448 bytes (megadalle/engine/kernel_compile.py).

    python tools/compile_kernels.py [--only 'train/*' ...] [--jobs 2] [--json OUT] [--warm-cache]

--warm-cache compiles into Triton's own cache, so that later launches on this machine find their kernels
(tools/gpu_check.sh, on the GPU machine's cores); the default is a fresh temporary cache (a cold timing).
Exit 0: all compiled within Hopper's limits; 1: a kernel failed (listed); 2: the tool itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported: compile them, not interpret them

from megadalle.engine.kernel_compile import HOPPER_SMEM, collect, compile_all, per_scenario, select, summary, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=None, help="fnmatch patterns of scenario names (default: all)")
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16), help="compile processes")
    ap.add_argument("--warm-cache", action="store_true", help="compile into Triton's cache (default: a fresh one)")
    ap.add_argument("--list", action="store_true", help="list the variants and their scenarios, compile nothing")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        variants = collect(select(a.only))
    except Exception:  # not a kernel's failure (exit 1 means that): say so with exit 2
        traceback.print_exc()
        print("compile_kernels: could not record the launches (exit 2)", file=sys.stderr)
        return 2
    print(f"{len(variants)} kernel variants for sm_90 ({time.perf_counter() - t0:.1f} s to record the launches)")
    if a.list:
        for v in variants:
            print(f"{v.name:<28} {v.config():<70} {v.num_warps}/{v.num_stages}  {' '.join(v.scenarios)}")
        return 0
    try:
        results = compile_all(variants, a.jobs, None if a.warm_cache else "")
    except Exception:  # the pool itself (a compile error is a result, not an exception)
        traceback.print_exc()
        print("compile_kernels: the compile processes failed (exit 2)", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    print(table(results))
    s = summary(results)
    print("\nper scenario (variants, compile seconds in one process):")
    for name, d in per_scenario(results).items():
        print(f"  {name:<34} {d['variants']:>4} {d['compile_s']:>8.1f}")
    print(f"\n{s['variants']} variants, {s['failed']} failed; max shared memory {s['max_shared']:,} B of "
          f"{HOPPER_SMEM:,}; max registers {s['max_registers']}; spilling: {len(s['spilling'])}; compile "
          f"{s['compile_s']:.0f} s in all, {wall:.0f} s wall with {a.jobs} processes")  # fmt: skip
    for line in s["spilling"]:
        print(f"  spills: {line}")
    if a.json:
        rows = [{"kernel": r.variant.name, "config": r.variant.config(), "num_warps": r.variant.num_warps,
                 "num_stages": r.variant.num_stages, "shared": r.shared, "registers": r.registers,
                 "spill_stores": r.spill_stores, "spill_loads": r.spill_loads, "seconds": round(r.seconds, 2),
                 "ok": r.ok, "error": r.error, "scenarios": list(r.variant.scenarios)} for r in results]  # fmt: skip
        with open(a.json, "w") as f:
            json.dump({"summary": s, "wall_s": round(wall, 1), "per_scenario": per_scenario(results), "rows": rows},
                      f, indent=1)  # fmt: skip
    if s["failed"]:
        for r in results:
            if not r.ok:
                print(f"FAILED {r.variant.name} {r.variant.config()}: {r.error or f'shared {r.shared} B'}",
                      file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
