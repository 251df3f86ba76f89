"""Never lose a run: train.py re-run with the same command continues, skips a truncated checkpoint, and a fresh
start in a used run folder is refused or moves the earlier output aside."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from megadalle.engine.checkpoint import load_eval_weights
from tests.conftest import REPO, python

pytestmark = pytest.mark.slow


def train(run_root: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python(), "megadalle/train.py", "--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={shards}",
         f"--job.run_root={run_root}", "--train.micro_batch_size=4", "--train.eval_every=0", "--checkpoint.every=2",
         "--checkpoint.keep=3", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def train_steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [m["step"] for m in map(json.loads, lines) if m["kind"] == "train"]


def ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_rerun_continues_skips_a_truncated_checkpoint_and_refuses_to_clobber(tmp_path, emoji_shards):
    run = tmp_path / "dvae_debug"
    proc = train(tmp_path, emoji_shards, "--train.steps=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ckpts(run) == ["step_00000002", "step_00000004"]
    assert all((run / "checkpoints" / t / "COMPLETE").is_file() for t in ckpts(run))

    # the same command with more steps: no flag needed to continue
    proc = train(tmp_path, emoji_shards, "--train.steps=6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_00000004 at step 4" in proc.stdout
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]
    assert ckpts(run) == ["step_00000002", "step_00000004", "step_00000006"]

    # the newest checkpoint truncated (a crash or a full disk): fall back to the previous complete one
    states = run / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    states.write_bytes(states.read_bytes()[: size // 2])
    proc = train(tmp_path, emoji_shards, "--train.steps=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"step_00000006: mp_rank_00_model_states.pt has {size // 2} bytes, marker says {size}" in proc.stdout
    assert "step_00000004 at step 4" in proc.stdout
    assert train_steps(run) == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # the abandoned steps 5-6 stay in the record
    assert ckpts(run) == ["step_00000004", "step_00000006", "step_00000008"], "keep=3 counts complete ones"
    assert states.stat().st_size == size, "the truncated step 6 was replaced by a complete one"

    # the newest checkpoint complete by its sizes but unreadable: reported by name, the previous one used
    states8 = run / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    states8.write_bytes(bytes(states8.stat().st_size))
    proc = train(tmp_path, emoji_shards, "--train.steps=10")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step_00000008" in proc.stdout and "fell back to the previous complete checkpoint" in proc.stdout
    assert "step_00000006 at step 6" in proc.stdout
    assert [p.name[:25] for p in (run / "checkpoints").glob("step_00000008.*")] == ["step_00000008.unloadable-"]
    assert train_steps(run)[-4:] == [7, 8, 9, 10]
    extra = torch.load(run / "checkpoints" / "step_00000010" / "extra.pt", weights_only=True)
    assert set(extra["loop"]["lr_schedule"]) == {"smoothed", "best", "since_best", "halvings"}

    # starting over in a used run folder: refused unless asked for, and then nothing is deleted
    proc = train(tmp_path, emoji_shards, "--train.steps=2", "--checkpoint.resume=none")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "holds checkpoints up to step 10" in proc.stdout + proc.stderr
    assert "--checkpoint.overwrite=true" in proc.stdout + proc.stderr
    proc = train(tmp_path, emoji_shards, "--train.steps=2", "--checkpoint.resume=none", "--checkpoint.overwrite=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert train_steps(run) == [1, 2] and ckpts(run) == ["step_00000002"]
    (old,) = run.glob("checkpoints.old-*")
    assert sorted(p.name[:25] for p in old.iterdir() if p.name.startswith("step_")) == [
        "step_00000006",
        "step_00000008",  # saved again after the fallback
        "step_00000008.unloadable-",  # the one that could not be loaded, kept for a look
        "step_00000010",
    ]
    (old_metrics,) = run.glob("metrics.old-*.jsonl")
    old_lines = [json.loads(x) for x in old_metrics.read_text().splitlines()]
    assert len([m for m in old_lines if m["kind"] == "train"]) == 14  # the whole record moved aside
    assert len(list(run.glob("config.old-*.toml"))) == 1 and len(list(run.glob("ds_config.old-*.json"))) == 1


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, emoji_shards):
    """The dVAE draws Gumbel noise every update: with the data position, the optimizer, the lr schedule, the EMA
    and every random generator restored, 3 + 3 updates give exactly the weights of 6."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for root, steps in ((whole, 6), (parts, 3), (parts, 6)):
        proc = train(root, emoji_shards, f"--train.steps={steps}", "--checkpoint.every=3")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "at step 3" in proc.stdout
    ckpt = "dvae_debug/checkpoints/step_00000006"
    a, b = (load_eval_weights(root / ckpt)[0] for root in (whole, parts))  # the EMA, from its shard files
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
