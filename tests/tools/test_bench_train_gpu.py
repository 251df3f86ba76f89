"""The GPU check's benchmarks run their whole path on the CPU: tools/bench_train_gpu.py (the debug prior, 2
updates, the planner's estimate beside it) and tools/bench_powersgd_kernels.py (the kernels under the Triton
interpreter against their PyTorch twins, small shapes)."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import REPO, python


def test_bench_train_gpu_smoke_on_cpu(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([python(), "tools/bench_train_gpu.py", "--flavor", "debug", "--steps", "2", "--warmup", "1",
                           "--device", "cpu", "--peak-tflops", "1", "--profile", "1", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["planner"]["tokens_per_s"] > 0
    assert "planner:" in proc.stdout
    assert set(r["phases_ms"]) == {"forward", "backward", "step"} and all(v > 0 for v in r["phases_ms"].values())
    assert "aten::" in r["top_ops"]


def test_bench_powersgd_kernels_smoke_on_cpu(tmp_path) -> None:
    out = tmp_path / "k.json"
    proc = subprocess.run([python(), "tools/bench_powersgd_kernels.py", "--rows", "32", "--cols", "24", "--rank",
                           "4", "--iters", "1", "--device", "cpu", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert set(r["torch_over_triton"]) == {"encode", "decode", "error_feedback", "decompress_update", "orthogonalize"}
    o = r["orthogonalize"]  # the head to head the engine's choice rests on: Triton Householder vs torch.linalg.qr
    assert o["triton_ms"] > 0 and o["torch_qr_ms"] > 0 and r["orthogonalize_faster"] == o["faster"]
    assert o["faster"] == ("triton" if o["triton_ms"] < o["torch_qr_ms"] else "torch_qr")
    assert "torch.linalg.qr" in proc.stdout
