"""tools/bench_train.py: each variant in its own process through tools/profile_step.py, one table with ratios to the
first variant (here the debug dVAE on the emoji shards, 1 timed update: the path, not the speed)."""

import json
import subprocess

import pytest

from tests.conftest import REPO, python


@pytest.mark.slow
def test_bench_train_runs_each_variant(tmp_path, emoji_shards) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run([python(), "tools/bench_train.py", "--stages", "dvae", "--variants", "fp32,bf16+compile",
                           "--steps", "1", "--warmup", "1", "--json", str(out), "--model.dvae_flavor=debug",
                           f"--data.shards={emoji_shards}", "--data.image_size=32", "--dvae.warm_start_images=16",
                           "--train.micro_batch_size=4"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["stage"], r["variant"]) for r in rows] == [("dvae", "fp32"), ("dvae", "bf16+compile")]
    base, compiled = rows
    assert base["ratio"] == 1.0 and base["compile_s"] == 0.0 and compiled["update_ms"] > 0
    assert compiled["compile_s"] > 0  # the first update compiled the resblocks
    assert "native bf16 on this CPU" in proc.stdout and "x base" in proc.stdout


def test_bench_train_rejects_unknown_variant() -> None:
    proc = subprocess.run([python(), "tools/bench_train.py", "--variants", "fp32,fp8"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "unknown variant 'fp8'" in proc.stderr
