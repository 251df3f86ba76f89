"""Training from S3 end to end (issue 13): train.py on 2 ranks reads an uploaded shard set through the endpoint
named in the config (not the environment), checks each shard's sha256, evaluates from S3, and its JSON lines count
the skipped samples of both ranks."""

from __future__ import annotations

import json

import pytest
import torch

from megadalle.data.s3 import upload_shard_set
from tests.conftest import REPO, torchrun
from tests.s3server import BUCKET

pytestmark = pytest.mark.distributed


def test_train_py_two_ranks_from_s3_with_the_configured_endpoint(flawed_shards, s3_server, tmp_path, monkeypatch):
    upload_shard_set(flawed_shards, f"s3://{BUCKET}/e2e/")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the config names the server now
    args = [
        "--config", "megadalle/configs/dvae_debug.toml", f"--data.shards=s3://{BUCKET}/e2e/",
        f"--data.s3_endpoint={s3_server.endpoint}", "--data.verify_sha256=true", "--data.num_workers=1",
        f"--job.run_root={tmp_path}", "--deepspeed_config", "ds_configs/zero3_cpu.json",
        "--train.micro_batch_size=4", "--train.steps=6", "--train.eval_every=6", "--checkpoint.every=6",
    ]  # fmt: skip
    proc = torchrun(REPO / "megadalle" / "train.py", nproc=2, args=args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "dvae_debug"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
    assert any(m["kind"] == "eval" and m["psnr_db"] > 0 for m in lines)  # the val split read from S3
    # both ranks' skips summed: the JSON count equals the two saved stream states' (48 samples read, 1 of 3 flawed)
    ckpt = run / "checkpoints" / "step_00000006"
    saved = [torch.load(ckpt / f"rank{r:05d}.pt", weights_only=True)["loader"]["stream"]["skips"] for r in range(2)]
    per_rank = [sum(sum(reasons.values()) for reasons in s.values()) for s in saved]
    assert all(n > 0 for n in per_rank) and train[-1]["skipped_samples"] == sum(per_rank)
    assert all(url.startswith(f"s3://{BUCKET}/e2e/train/") for s in saved for url in s)
    assert "s3cr3t" not in proc.stdout + proc.stderr
