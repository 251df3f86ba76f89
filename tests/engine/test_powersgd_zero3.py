"""PowerSGD inside ZeRO-3 as hierarchical sharding (engine/ds_powersgd.py), on 4 real processes as 2 node groups x
2 GPUs (gloo), training the debug prior through train.py: the uncompressed hierarchical path equals plain ZeRO-3
over all 4 ranks, PowerSGD trains to within 2% of it, every rank ends with the same parameters, and a resume
from a checkpoint continues the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, torchrun

STEPS = 20
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _run(tmp_path: Path, name: str, token_shards: Path, tokenizer_model: Path, monkeypatch, *extra: str):
    """train.py on 4 ranks; each rank dumps the gathered model at every checkpoint into tmp_path/NAME_params."""
    args = ["--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={token_shards}",
            f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={tmp_path}", f"--job.name={name}",
            "--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--train.micro_batch_size=2",
            "--train.log_every=1", "--train.eval_every=0", "--optim.ema_decay=0", "--logging.progress=off",
            f"--train.steps={STEPS}", *extra]  # fmt: skip
    dump = tmp_path / f"{name}_params"
    dump.mkdir(exist_ok=True)
    monkeypatch.setenv("TRAIN_WORKER_DUMP", str(dump))
    proc = torchrun(REPO / "tests" / "engine" / "train_worker.py", nproc=4, args=args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"], dump


HIER = ["--powersgd.enabled=true", "--parallel.gpus_per_node=2"]


def test_powersgd_in_zero3_node_groups(tmp_path, token_shards, tokenizer_model, monkeypatch):
    run = lambda name, *extra: _run(tmp_path, name, token_shards, tokenizer_model, monkeypatch, *extra)  # noqa: E731
    plain, _ = run("plain")
    hier, _ = run("hier", *HIER, "--powersgd.start_iter=1000000")
    # sharding inside node groups + one fp32 all-reduce between them is plain ZeRO-3 over the 4 ranks
    for a, b in zip(hier, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]
    psgd, dumps = run("psgd", *HIER, "--powersgd.rank=16")
    assert len(psgd) == STEPS and all(r["skipped_steps"] == 0 for r in psgd)
    tail = lambda rs: sum(r["loss"] for r in rs[-5:]) / 5  # noqa: E731
    assert tail(psgd) == pytest.approx(tail(hier), rel=0.02), (tail(psgd), tail(hier))
    assert tail(psgd) < psgd[0]["loss"] - 0.5  # it trains
    assert tail(psgd) != tail(hier)  # and it did compress
    # every rank (both node groups) holds the same parameters
    states = [torch.load(dumps / f"params_{r}_step{STEPS}.pt") for r in range(4)]
    for s in states[1:]:
        assert s.keys() == states[0].keys() and all(torch.equal(s[k], states[0][k]) for k in s)
    # App. E.2's checkpoint: the error buffers summed over node groups, one file per local ordinal
    folder = tmp_path / "psgd" / "checkpoints" / f"step_{STEPS:08d}"
    files = sorted(p.name for p in folder.glob("powersgd_local*.pt"))
    assert files == ["powersgd_local0.pt", "powersgd_local1.pt"]
    # node group 0 writes DeepSpeed's files (named by the rank in the node group: the other group's copies would
    # write the same names), each rank its own data position
    assert sorted(p.name for p in folder.glob("*optim_states.pt")) == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                                       for r in range(2)]  # fmt: skip
    assert sorted(p.name for p in folder.glob("rank*.pt")) == [f"rank{r:05d}.pt" for r in range(4)]
    saved = torch.load(folder / files[0], weights_only=True)
    assert saved["updates"] == STEPS  # the compress decision's count, beside the buffers
    buffers = saved["buffers"]
    assert buffers["layers.0.attn.qkv.weight"].shape == (64, 96)  # 192 x 64 over 2 GPUs, transposed
    # only the resblocks' matmul weights are compressed: embeddings, heads, gains and biases are not (App. E.2)
    assert sorted(buffers) == sorted(f"layers.{i}.{m}.weight" for i in range(4)
                                     for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))  # fmt: skip

    # save at step 10, resume: the next step's loss is the uninterrupted run's, and the run goes on like it
    half = ["--train.steps=10"]
    run("resumed", *HIER, "--powersgd.rank=16", *half)
    resumed, _ = run("resumed", *HIER, "--powersgd.rank=16")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed[10]["loss"] == pytest.approx(psgd[10]["loss"], rel=1e-6)  # step 11: the parameters of step 10
    for a, b in zip(resumed[11:], psgd[11:]):  # each node group restarts from the mean error buffer
        assert a["loss"] == pytest.approx(b["loss"], rel=0.01), a["step"]
    # uncompressed, the resumed run is the uninterrupted one (Adam's state and the data position restored), and
    # the EMA each node group keeps comes back too (it is partitioned inside the node group)
    ema = ["--optim.ema_decay=0.9", "--powersgd.start_iter=1000000"]
    run("resumed_hier", *HIER, *ema, *half)
    again, dumps = run("resumed_hier", *HIER, *ema)
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in hier], rel=1e-6)
    states = [torch.load(dumps / f"ema_{r}_step{STEPS}.pt") for r in range(4)]
    for s in states[1:]:
        assert all(torch.equal(s[k], states[0][k]) for k in s)
    # its shards written once, by node group 0: one file per rank of a node group
    folder = tmp_path / "resumed_hier" / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in folder.glob("ema_shard*")) == [f"ema_shard{i:05d}.safetensors" for i in range(2)]
