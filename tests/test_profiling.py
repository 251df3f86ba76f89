"""tools/profile_step.py (megadalle/profiling.py): an update of each stage split into its phases, which add up to the
update's wall time, with torch.profiler's top operators; on 1 rank and on 2 under ZeRO-3."""

from __future__ import annotations

import json
import subprocess

import pytest

from megadalle.profiling import PHASES
from tests.conftest import REPO, python, torchrun


def check(report: dict, stage: str) -> None:
    assert report["stage"] == stage and report["steps"] == 3
    phases = report["phases"]
    assert list(phases) == [*PHASES, "other"] and all(ms >= 0 for ms in phases.values())
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["step"] > 0 and phases["data"] > 0
    assert sum(phases.values()) == pytest.approx(report["update_ms"], rel=1e-6), "the phases make up the update"
    assert phases["other"] < 0.25 * report["update_ms"], "the phases account for most of the update"
    assert "aten::" in report["top_ops"] and report["first_update_ms"] > 0


def test_each_stage_profiled_on_one_rank(emoji_shards, token_shards, tokenizer_model, tmp_path):
    for config, stage, extra in (
        ("dvae_debug", "dvae", [f"--data.shards={emoji_shards}"]),
        ("prior_debug", "prior", [f"--prior.tokens={token_shards}", f"--tokenizer.model_path={tokenizer_model}"]),
    ):
        out = tmp_path / f"{stage}.json"
        proc = subprocess.run([python(), "tools/profile_step.py", "--config", f"megadalle/configs/{config}.toml",
                               "--steps", "3", "--warmup", "1", "--json", str(out), f"--job.run_root={tmp_path}",
                               *extra], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        check(json.loads(out.read_text()), stage)
        assert "ms per update" in proc.stdout and "backward" in proc.stdout
        assert not (tmp_path / config).exists(), "nothing written into a run folder"


@pytest.mark.distributed
def test_two_ranks_under_zero3(emoji_shards, tmp_path):
    out = tmp_path / "dvae.json"
    proc = torchrun(REPO / "tools/profile_step.py", 2, [
        "--config", "megadalle/configs/dvae_debug.toml", "--steps", "3", "--warmup", "1", "--json", str(out),
        f"--data.shards={emoji_shards}", f"--job.run_root={tmp_path}",
        "--parallel.deepspeed_config=ds_configs/zero3_cpu.json"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    check(report, "dvae")
    assert report["world"] == 2 and proc.stdout.count("ms per update") == 1, "rank 0 reports"
