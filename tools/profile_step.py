#!/usr/bin/env python
"""Where an update's time goes, for any stage and run file (megadalle/profiling.py):

    python tools/profile_step.py --config megadalle/configs/dvae_small.toml [--steps 5] [--warmup 2] [--top 15] \
        [--json OUT.json] [--section.key=value ...]
    torchrun --nproc_per_node 2 tools/profile_step.py --config ... --parallel.deepspeed_config=ds_configs/zero3_cpu.json

Builds the stage as train.py does (DeepSpeed, the wrappers, the EMA), runs the warm-up and timed updates, and
prints on rank 0 the phases of an update (data, forward, backward, step, reduce, ema, log, other) in ms and as a
share, then torch.profiler's top operators of one more update. Writes nothing into the run's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from megadalle.config import ConfigError, load_config
from megadalle.engine.denormals import flush_denormals
from megadalle.engine.distributed import init_distributed, shutdown
from megadalle.engine.metrics import setup_logging
from megadalle.profiling import profile_updates, table


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # as train.py: before the first torch operation starts the thread pool
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed updates")
    ap.add_argument("--warmup", type=int, default=2, help="updates before the timed ones")
    ap.add_argument("--top", type=int, default=15, help="rows of torch.profiler's operator table")
    ap.add_argument("--json", default="", help="also write the report to this file")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(rest)
    except ConfigError as e:
        print(f"profile_step: config error: {e}", file=sys.stderr)
        return 2
    rank, _ = init_distributed(cfg.parallel.collective_timeout_s)
    setup_logging("WARNING", rank, None)  # the build's INFO lines are train.py's; here only the report
    try:
        report = profile_updates(cfg, args.steps, args.warmup, args.top)
    except (ValueError, FileNotFoundError) as e:
        print(f"profile_step: error: {e}", file=sys.stderr)
        shutdown(barrier=False)
        return 2
    except Exception:  # as train.py: a collective may hang on a peer that failed, so no teardown
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if rank == 0:
        print(table(report))
        print(report["top_ops"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
