"""The per-resblock gradient scaler inside DeepSpeed's ZeRO-3 engine under fp16 (autocast, fp32 parameter
storage), on 2 real processes: training tracks the same run in fp32, the scales follow App. D's rules and survive
a checkpoint round trip, the parameters App. D.2 names are stored and gathered in fp32, and the DeepSpeed config
is what the scaler needs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megadalle.config import ConfigError, load_config
from megadalle.engine.ds_config import fill_ds_config, grad_scaler_mode, load_ds_config
from tests.conftest import REPO, torchrun

STEPS = 20


def _run(tmp_path: Path, name: str, token_shards: Path, tokenizer_model: Path, *extra: str) -> list[dict]:
    args = ["--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={token_shards}",
            f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={tmp_path}", f"--job.name={name}",
            "--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--train.micro_batch_size=4",
            "--train.log_every=1", "--train.eval_every=0", "--optim.ema_decay=0", "--optim.warmup_steps=0",
            "--optim.lr=1e-3", "--logging.progress=off", *extra]  # fmt: skip
    proc = torchrun(REPO / "tests" / "engine" / "fp16_worker.py", nproc=2, args=args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.distributed
def test_fp16_per_resblock_tracks_fp32_and_resumes_its_scales(tmp_path, token_shards, tokenizer_model, monkeypatch):
    """The blocks' scales start spread over 2^10..2^17 (FP16_WORKER_SPREAD), so each block's gradients must be
    divided by its own scale for the fp16 run to track the fp32 one."""
    fp32 = _run(tmp_path, "fp32", token_shards, tokenizer_model, f"--train.steps={STEPS}")
    monkeypatch.setenv("FP16_WORKER_SPREAD", "1")
    p16 = "--optim.moments=paper16"  # prior_12b.toml's 16-bit Adam moments, resumed below
    fp16 = _run(
        tmp_path, "fp16", token_shards, tokenizer_model, f"--train.steps={STEPS}", "--train.precision=fp16", p16
    )
    assert [r["step"] for r in fp16] == list(range(1, STEPS + 1))
    for a, b in zip(fp16, fp32):  # the same data and initial weights: fp16 rounding only
        assert abs(a["loss"] - b["loss"]) <= 0.02 * b["loss"], (a["step"], a["loss"], b["loss"])
        # the gradient norm DeepSpeed clips with: the scales were divided out before it was taken
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 0.05 * b["grad_norm"], (
            a["step"],
            a["grad_norm"],
            b["grad_norm"],
        )
    assert fp16[-1]["loss"] < fp16[0]["loss"] - 0.1, "fp16 trains"
    n_blocks = 2 * 4  # prior_debug: 4 layers x (attention, MLP)
    spread = [14 + i - 4 for i in range(n_blocks)]
    first, last = fp16[0], fp16[-1]
    assert len(first["grad_scale_log2"]) == n_blocks and last["grad_scale_skipped_updates"] == 0
    # + 1/1000 after each applied update (no overflow in this run); S starts at 2^13 (at any world size)
    assert last["grad_scale_log2"] == pytest.approx([s + STEPS / 1000 for s in spread], abs=1e-9)
    assert last["grad_scale_log2_outside"] == pytest.approx(13 + STEPS / 1000, abs=1e-9)  # the loss scale
    assert last["skipped_steps"] == 0 and all(r["grad_norm"] > 0 for r in fp16)

    # checkpoint round trip, with activation checkpointing (recomputed under autocast): 10 updates, which track the
    # run without it, then a resumed run to 20 continues the scales (not the initial ones again) and the losses
    ckpt = ["--train.precision=fp16", "--train.activation_checkpointing=true", p16]
    _run(tmp_path, "resumed", token_shards, tokenizer_model, "--train.steps=10", *ckpt)
    resumed = _run(tmp_path, "resumed", token_shards, tokenizer_model, f"--train.steps={STEPS}", *ckpt)
    after = [r for r in resumed if r["step"] == 11]
    assert after and after[0]["grad_scale_log2"] == pytest.approx([s + 11 / 1000 for s in spread], abs=1e-9)
    for r in resumed:  # the data position is restored too: the resumed run is the uninterrupted one
        ref = fp16[r["step"] - 1]
        assert abs(r["loss"] - ref["loss"]) <= 0.01 * ref["loss"], (r["step"], r["loss"], ref["loss"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)) and resumed[-1]["skipped_steps"] == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_an_inf_on_one_rank_skips_the_update_on_both_and_drops_one_scale(
    tmp_path, token_shards, tokenizer_model, monkeypatch, capsys
):
    """Rank 0 alone sees an Inf in the gradient leaving resblock 5's branch at update 4 (its parameter gradients
    stay finite, so DeepSpeed's own check sees nothing): both ranks skip that update (the flags are all-reduced),
    only block 5's scale is divided by sqrt(2), the ranks' scalers agree, and training goes on; the Figure 12
    plot shows it. At update 6 DeepSpeed's clipping norm is Inf from finite partitions: skipped, S divided. The
    stored, reduce-scattered, gathered and computed dtypes are App. D.2's."""
    monkeypatch.setenv("FP16_WORKER_POISON", "5:4")
    monkeypatch.setenv("FP16_WORKER_NORM_INF", "6")  # and at update 6 DeepSpeed's clipping norm is Inf
    monkeypatch.setenv("FP16_WORKER_DUMP", str(tmp_path))
    # no persistent parameters: every gather is a real fetch in the parameter's communication dtype
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    runs = _run(tmp_path, "poisoned", token_shards, tokenizer_model, "--train.steps=8", "--train.precision=fp16",
                f"--parallel.deepspeed_config={tmp_path / 'ds.json'}")  # fmt: skip
    by_step = {r["step"]: r for r in runs}
    assert [by_step[s]["skipped_steps"] for s in (3, 4, 5, 6, 8)] == [0, 1, 1, 2, 2]
    assert by_step[4]["grad_scale_skips"] == [int(b == 5) for b in range(8)]
    base = 13
    want = [base + 3 / 1000 - (0.5 if b == 5 else 0) for b in range(8)]  # 3 applied updates, then the skip
    assert by_step[4]["grad_scale_log2"] == pytest.approx(want, abs=1e-9)
    # update 6: every partition finite, the norm not: skipped, charged to S (the outside scale), no growth
    assert by_step[6]["grad_scale_log2_outside"] == pytest.approx(base + 4 / 1000 - 0.5, abs=1e-9)
    want = [base + 6 / 1000 - (0.5 if b == 5 else 0) for b in range(8)]  # 6 applied updates of 8
    assert by_step[8]["grad_scale_log2"] == pytest.approx(want, abs=1e-9)
    assert by_step[8]["grad_scale_log2_outside"] == pytest.approx(base + 6 / 1000 - 0.5, abs=1e-9)
    assert all(math.isfinite(r["loss"]) for r in runs) and by_step[8]["loss"] < by_step[1]["loss"]
    states = [torch.load(tmp_path / f"scaler_{rank}.pt") for rank in (0, 1)]
    for key in ("log2_scales", "last_division", "skips"):
        assert torch.equal(states[0][key], states[1][key]), key  # rank 1 skipped and divided too
    assert states[1]["skips"].tolist() == [int(b == 5) for b in range(8)] + [1]  # 8 blocks, then the outside scale

    # App. D.2: gains, biases, embeddings and the unembedding stored and gathered in fp32; the matmul weights
    # gathered in fp16 and the matmuls computed in fp16; the logits and the residual stream in fp32
    dtypes = json.loads((tmp_path / "dtypes_0.json").read_text())
    params = {k for k in dtypes if ":" not in k}
    assert all(dtypes[k] == ["torch.float32"] for k in params)  # every partition stored in fp32
    matmul = {k for k in params if k.endswith("weight") and any(f".{m}." in k for m in ("qkv", "proj", "fc"))}
    fp32 = params - matmul
    assert len(matmul) == 4 * 4 and {k.rsplit(".", 1)[-1] for k in fp32} == {"weight", "bias"}
    assert {"text_emb.weight", "text_head.weight", "image_head.weight", "layers.0.attn.ln.weight"} <= fp32
    assert {k: dtypes[f"reduced:{k}"] for k in matmul} == {k: ["torch.float16"] for k in matmul}
    assert {k: dtypes[f"reduced:{k}"] for k in fp32} == {k: ["torch.float32"] for k in fp32}
    linears = {k.rsplit(".", 1)[0] for k in matmul}  # the last gathered values (after 6 applied updates):
    assert all(dtypes[f"gathered:{m}.weight"] == [True] for m in linears)  # fp16 on the wire
    assert all(dtypes[f"gathered:{m}.bias"] == [False] for m in linears)  # fp32 on the wire
    fp16_out = ("layers.0.attn.ln", "layers.0.attn.qkv", "layers.3.mlp.fc", "layers.3.mlp.proj")
    assert all(dtypes[f"out:{m}"] == ["torch.float16"] for m in fp16_out)  # inside the branches
    assert dtypes["out:text_emb"] == dtypes["out:layers.0.attn"] == dtypes["out:layers.3.mlp"] == ["torch.float32"]
    assert all(v == ["torch.float32"] for k, v in dtypes.items() if k.startswith("out:") and "head" in k)

    from plot_grad_scales import main as plot_main

    out = tmp_path / "grad_scales.png"
    assert plot_main([str(tmp_path / "poisoned"), "--out", str(out)]) == 0
    assert "8 resblocks, 8 points, skipped updates: 2" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size[0] > 500 and len(np.unique(np.asarray(im.convert("L")))) > 10  # a drawn figure, not a blank


def test_ds_config_runs_per_resblock_fp16_through_autocast_with_fp32_parameters():
    base = ["--config", "megadalle/configs/prior_debug.toml", "--train.precision=fp16"]
    z3 = [*base, "--parallel.deepspeed_config=ds_configs/zero3_cpu.json"]
    ds = load_ds_config(load_config(z3), 2)
    assert "fp16" not in ds and ds["data_types"]["grad_accum_dtype"] == "fp32"  # DeepSpeed's fp16 mode is off
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "torch.float16",
                                    "lower_precision_safe_modules": ["megadalle.models.layers.Linear"]}  # fmt: skip
    assert grad_scaler_mode(load_config(z3), ds) == "per_resblock"
    assert fill_ds_config(ds, load_config(z3), 2) == ds  # filling a filled config changes nothing
    ds = load_ds_config(load_config([*z3, "--train.grad_scaler=global"]), 2)
    assert ds["fp16"]["loss_scale"] == 0 and "torch_autocast" not in ds  # DeepSpeed's dynamic scale, as the file says
    z1 = load_ds_config(load_config([*base, "--parallel.deepspeed_config=ds_configs/zero1_cpu.json"]), 2)
    assert z1["fp16"]["loss_scale"] == 0  # auto: DeepSpeed's global scale where the per-block one cannot run
    explicit = [*base, "--parallel.deepspeed_config=ds_configs/zero1_cpu.json", "--train.grad_scaler=per_resblock"]
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_ds_config(load_config(explicit), 2)
    dvae = ["--config", "megadalle/configs/dvae_debug.toml", "--train.precision=fp16", "--train.grad_scaler=none"]
    assert load_ds_config(load_config(dvae), 2)["fp16"]["loss_scale"] == 1
    bf16 = load_ds_config(load_config([*base[:2], "--train.precision=bf16"]), 2)
    assert "data_types" not in bf16 and "torch_autocast" not in bf16  # off in bf16
    file = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    with pytest.raises(ConfigError, match="torch_autocast is enabled but train.precision is fp32"):
        fill_ds_config({**file, "torch_autocast": {"enabled": True}}, load_config(base[:2]), 2)
    with pytest.raises(ConfigError, match="torch_autocast in fp16 runs only with train.grad_scaler = per_resblock"):
        fill_ds_config(
            {**file, "torch_autocast": {"enabled": True}}, load_config([*z3, "--train.grad_scaler=global"]), 2
        )
    with pytest.raises(ConfigError, match="torch_autocast.dtype is 'torch.bfloat16' but train.precision is fp16"):
        fill_ds_config({**file, "torch_autocast": {"enabled": True, "dtype": "torch.bfloat16"}}, load_config(z3), 2)
