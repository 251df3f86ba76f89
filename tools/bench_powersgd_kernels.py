#!/usr/bin/env python
"""PowerSGD's kernels (kernels/powersgd.py: the 1-6-9 codec, the error-feedback updates, Householder
orthogonalisation) against their PyTorch twins (the CPU path, run here on the same device), on one 12B resblock
matrix shard as one GPU of a node holds it: rows m / 8 of (d_ff = 4 x 3968) x 3968, rank 896 / 8 = 112.

    python tools/bench_powersgd_kernels.py [--rows 1984] [--cols 3968] [--rank 112] [--iters 20] [--json OUT]

Median milliseconds per operation after a warm-up; the ratio is what to read. On the CPU the Triton side runs
under the interpreter: pass small shapes (--rows 64 --cols 48 --rank 4 --iters 2) for a smoke run.

Orthogonalisation is also timed head to head, whatever `ops_for` picks: the Triton Householder kernel
(`kernels.powersgd.orthogonalize`, one program: grid (1,), serial over the r columns) against cuSOLVER's
`torch.linalg.qr` (the Q factor of p + eps I), on the (rows, rank) P of the shard: the JSON's
`orthogonalize_faster` ("triton" or "torch_qr") is the one the engine should use on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn, iters: int, device: torch.device) -> float:
    """Median milliseconds of fn() over `iters` calls after one warm-up."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def orthogonalize_head_to_head(p: torch.Tensor, iters: int, device: torch.device, eps: float = 1e-6) -> dict:
    """Median ms of the Triton Householder kernel and of torch.linalg.qr's Q of p + eps I, their ratio, and which
    is faster (`ops_for` may pick either; this measures both)."""
    from kernels.powersgd import orthogonalize

    eye = eps * torch.eye(*p.shape, dtype=p.dtype, device=p.device)
    triton_ms = timed(lambda: orthogonalize(p, eps), iters, device)
    qr_ms = timed(lambda: torch.linalg.qr(p + eye).Q, iters, device)
    return {"triton_ms": triton_ms, "torch_qr_ms": qr_ms, "torch_qr_over_triton": qr_ms / triton_ms,
            "faster": "triton" if triton_ms < qr_ms else "torch_qr"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4 * 3968 // 8)
    ap.add_argument("--cols", type=int, default=3968)
    ap.add_argument("--rank", type=int, default=112)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():  # the Triton side under the interpreter; set before the kernels load
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels.powersgd import KERNELS, TORCH

    device = torch.device(a.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = (torch.randn(a.rows, a.cols, generator=g) * 1e-3).to(device)
    p = torch.randn(a.rows, a.rank, generator=g).to(device)
    q = torch.randn(a.cols, a.rank, generator=g).to(device)
    rows = []
    for name, ops in (("triton", KERNELS), ("torch", TORCH)):
        codes = ops.encode(grad)
        e = codes.clone()
        rows.append({
            "impl": name,
            "encode_ms": timed(lambda ops=ops: ops.encode(grad), a.iters, device),
            "decode_ms": timed(lambda ops=ops, c=codes: ops.decode(c), a.iters, device),
            "error_feedback_ms": timed(lambda ops=ops, e=e: ops.error_feedback_add_(e, grad, 1.0), a.iters, device),
            "decompress_update_ms": timed(lambda ops=ops, e=e: ops.decompress_update_(e, p, q, 2), a.iters, device),
            "orthogonalize_ms": timed(lambda ops=ops: ops.orthogonalize(p), a.iters, device),
        })  # fmt: skip
    keys = [k for k in rows[0] if k.endswith("_ms")]
    ortho = orthogonalize_head_to_head(p, a.iters, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": a.rows,
              "cols": a.cols, "rank": a.rank, "ms": rows,
              "torch_over_triton": {k[:-3]: rows[1][k] / rows[0][k] for k in keys},
              "orthogonalize": ortho, "orthogonalize_faster": ortho["faster"]}  # fmt: skip
    print(f"{'operation':<20}{'triton ms':>12}{'torch ms':>12}{'torch / triton':>16}")
    for k in keys:
        print(f"{k[:-3]:<20}{rows[0][k]:>12.3f}{rows[1][k]:>12.3f}{rows[1][k] / rows[0][k]:>15.2f}x")
    slow, fast = sorted((ortho["triton_ms"], ortho["torch_qr_ms"]), reverse=True)
    print(f"orthogonalize P ({a.rows} x {a.rank}): Triton Householder (one program) {ortho['triton_ms']:.3f} ms, "
          f"torch.linalg.qr {ortho['torch_qr_ms']:.3f} ms: {ortho['faster']} faster, {slow / fast:.2f}x")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
