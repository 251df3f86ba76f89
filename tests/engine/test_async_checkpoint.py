"""checkpoint.async_save on 2 real ZeRO-3 ranks: the files equal a synchronous save's, the marker comes only once
every rank has written, a crash mid-write leaves the previous complete checkpoint (which a resume takes), and a
failed write is an error on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megadalle.engine.checkpoint import MARKER, find_resume, incomplete_reason, open_eval_weights
from tests.conftest import REPO, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = REPO / "tests" / "engine" / "async_worker.py"


def args(root: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={shards}", f"--job.run_root={root}",
            "--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--train.micro_batch_size=4",
            "--train.eval_every=0", *extra]  # fmt: skip


def test_async_train_py_writes_what_a_synchronous_save_writes(tmp_path, emoji_shards):
    runs = {}
    for name, flag in (("sync", "false"), ("async", "true")):
        root = tmp_path / name
        proc = torchrun(REPO / "megadalle" / "train.py", 2, args(root, emoji_shards, "--train.steps=4",
                        "--checkpoint.every=2", f"--checkpoint.async_save={flag}"))  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = root / "dvae_debug"
        if flag == "true":
            assert "step 2: checkpoint queued" in proc.stdout  # in the background, not in the loop
            assert "step 4: checkpoint written" in proc.stdout  # the run's last: written before it stops
    for step in (2, 4):
        folders = {n: r / "checkpoints" / f"step_{step:08d}" for n, r in runs.items()}
        assert all(incomplete_reason(f) is None for f in folders.values())
        files = {n: sorted(p.name for p in f.iterdir()) for n, f in folders.items()}
        assert files["sync"] == files["async"], files
        for kind in ("ema", "live"):
            a, b = (open_eval_weights(f, kind) for f in folders.values())
            assert all(torch.equal(t, b.read(k)) for k, t in a.items()), (step, kind)
    losses = {n: [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["kind"] == "train"] for n, r in runs.items()}  # fmt: skip
    assert losses["sync"] == losses["async"] and len(losses["sync"]) == 4


def test_a_crash_mid_write_leaves_the_previous_complete_checkpoint(tmp_path, emoji_shards):
    root = tmp_path / "run"
    proc = torchrun(WORKER, 2, ["crash", *args(root, emoji_shards, "--checkpoint.async_save=true")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = root / "dvae_debug"
    records = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
    for r in records:  # queued: not complete when save returned; complete after an update or a few
        assert not r["queued_complete"] and r["complete"] and 1 <= r["updates_to_complete"] <= 10, r
    first, second = run / "checkpoints" / "step_00000001", run / "checkpoints" / f"step_{records[0]['crashed_at']:08d}"
    assert incomplete_reason(first) is None and not (second / MARKER).exists()
    assert find_resume(run / "checkpoints", "auto") == first
    proc = torchrun(REPO / "megadalle" / "train.py", 2, args(root, emoji_shards, "--train.steps=3"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "missing COMPLETE marker" in proc.stdout + proc.stderr and "at step 1" in proc.stdout


def test_a_failed_background_write_is_an_error_on_every_rank(tmp_path, emoji_shards):
    root = tmp_path / "run"
    proc = torchrun(WORKER, 2, ["fail", *args(root, emoji_shards, "--checkpoint.async_save=true")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads((root / "dvae_debug" / f"rank{r}.json").read_text()) for r in range(2)]
    assert "failed on 1 rank(s) (not here)" in records[0]["error"]
    assert "failed on 1 rank(s) (here: OSError: [Errno 28] No space left on device)" in records[1]["error"]
    assert all("stays incomplete" in r["error"] for r in records)
    folder = root / "dvae_debug" / "checkpoints" / "step_00000001"
    assert (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file() and not (folder / MARKER).exists()
    assert find_resume(root / "dvae_debug" / "checkpoints", "auto") is None
