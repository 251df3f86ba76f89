"""Evaluation on the training engine (train.py's `_evaluate`): 2 ZeRO-3 ranks each evaluate their share of the
batches with the EMA swapped into their own shards, and must give what one plain PyTorch process gives for a
model holding the same EMA weights; the live weights and the optimizer come back bit for bit, so training goes on
as if nothing happened. The dVAE's and the prior's cases have an odd number of evaluation batches (the stand-in
path)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = REPO / "tests" / "engine" / "eval_worker.py"
UPDATES = 3  # eval_worker.UPDATES
ZERO3 = "--parallel.deepspeed_config=ds_configs/zero3_cpu.json"


def run(out: Path, evaluate: bool, args: list[str], nproc: int = 2) -> list[dict]:
    out.mkdir()
    proc = torchrun(WORKER, nproc=nproc, args=[str(out), "1" if evaluate else "0", *args], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def reference(args: list[str], ema: Path, out_dir: Path) -> dict[str, float]:
    """Plain PyTorch in this process (no DeepSpeed, no process group): the stage's evaluation of a plain model
    loaded with the whole EMA weights."""
    from megadalle.config import load_config
    from megadalle.stages import make_stage

    stage = make_stage(load_config(args))
    model = stage.build_model()
    model.load_state_dict(torch.load(ema, weights_only=True))
    return stage.evaluate(model.eval(), UPDATES, out_dir)


def max_relative_difference(got: dict[str, float], want: dict[str, float]) -> float:
    assert got.keys() == want.keys()
    return max(abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in want)


def check(ranks: list[dict], args: list[str], out: Path, name: str, rtol: float = 1e-5) -> float:
    """The ranks agree, equal the reference to `rtol`, and left the training state as they found it."""
    assert all(r["metrics"] == ranks[0]["metrics"] for r in ranks), "every rank returns the same metrics"
    assert all(r["unchanged"] and r["held"] > 0 for r in ranks), "partitions, master weights and moments restored"
    assert all(r["training"] for r in ranks), "the module is back in training mode"
    assert all(r["digest"] == ranks[0]["digest"] for r in ranks)
    want = reference(args, out / "ema.pt", out / "reference")
    got = ranks[0]["metrics"]
    assert all(math.isfinite(v) for v in got.values()), got
    rel = max_relative_difference(got, want)
    print(f"{name}: {len(ranks)}-rank engine evaluation vs single-process reference: max relative difference "
          f"{rel:.3g}")  # fmt: skip
    assert rel <= rtol, (got, want)
    live = reference(args, out / "live.pt", out / "live")
    assert max_relative_difference(live, want) > 1e-4, "the EMA was evaluated, not the live weights"
    return rel


def test_dvae_on_the_engine_equals_one_process_and_training_goes_on(tmp_path, emoji_shards):
    args = ["--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={emoji_shards}", ZERO3,
            "--train.micro_batch_size=4", "--dvae.eval_batches=3", "--dvae.grid_images=4"]  # fmt: skip
    evaluated = run(tmp_path / "eval", True, args)
    check(evaluated, args, tmp_path / "eval", "dvae")
    assert evaluated[0]["metrics"]["val_images"] == 12  # 3 batches: rank 0 has 0 and 2, rank 1 1 and a stand-in
    grid = f"recon_step{UPDATES:08d}.png"
    engine_png = np.asarray(Image.open(tmp_path / "eval" / "images" / grid), dtype=np.int16)
    plain_png = np.asarray(Image.open(tmp_path / "eval" / "reference" / grid), dtype=np.int16)
    assert engine_png.shape == plain_png.shape == (2 * 32, 4 * 32, 3)
    assert np.abs(engine_png - plain_png).max() <= 1  # uint8 rounding of equal reconstructions
    plain = run(tmp_path / "plain", False, args)  # the same run without the evaluation
    assert [r["next_loss"] for r in evaluated] == [r["next_loss"] for r in plain]
    assert evaluated[0]["digest"] == plain[0]["digest"], "the next update lands on the same parameters"


def test_dvae_on_four_ranks(tmp_path, emoji_shards):
    """3 batches over 4 ranks: rank 3 evaluates a stand-in only."""
    args = ["--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={emoji_shards}", ZERO3,
            "--train.micro_batch_size=2", "--dvae.eval_batches=3", "--dvae.grid_images=2"]  # fmt: skip
    ranks = run(tmp_path / "eval", True, args, nproc=4)
    check(ranks, args, tmp_path / "eval", "dvae")
    assert ranks[0]["metrics"]["val_images"] == 6


def test_prior_on_the_engine_equals_one_process(tmp_path, token_shards, tokenizer_model):
    args = ["--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={token_shards}",
            f"--tokenizer.model_path={tokenizer_model}", ZERO3, "--prior.eval_batches=3", "--optim.ema_decay=0.5",
            "--train.activation_checkpointing=true"]  # fmt: skip
    ranks = run(tmp_path / "eval", True, args)
    check(ranks, args, tmp_path / "eval", "prior")
    assert {"val_loss", "val_text_loss", "val_image_loss", "zeroshot_loss"} <= ranks[0]["metrics"].keys()


def test_clip_on_the_engine_equals_one_process(tmp_path, emoji_shards, tokenizer_model):
    # batches of 64 (the emoji set's splits hold 80 and 81): 64 + 16 and 64 + 17, the second on rank 1, its
    # embeddings placed after the first's (the stand-in path is the dVAE's and the prior's)
    args = ["--config", "megadalle/configs/clip_debug.toml", f"--data.shards={emoji_shards}",
            f"--tokenizer.model_path={tokenizer_model}", ZERO3, "--train.micro_batch_size=8",
            "--train.eval_samples=100", "--optim.ema_decay=0.5"]  # fmt: skip
    ranks = run(tmp_path / "eval", True, args)
    check(ranks, args, tmp_path / "eval", "clip")
    m = ranks[0]["metrics"]
    assert m["val_n"] == 80 and m["zeroshot_n"] == 81, m


@pytest.mark.parametrize("case", ["dvae-bf16", "dvae-bf16-zero2", "prior-fp16"])
def test_low_precision_evaluates_in_training_precision(case, tmp_path, request):
    """bf16 ZeRO-3 (16-bit partitions, fp32 master copies), bf16 ZeRO-2 (whole 16-bit parameters on every rank) and
    the prior's fp16 route (fp32 partitions shared with the optimizer, fp16 matmuls under the engine's autocast,
    per-resblock gradient scaler wrappers): the EMA is swapped into the parameters and back bit for bit; the
    metrics are the fp32 reference's to 16-bit rounding."""
    if case.startswith("dvae"):
        shards = request.getfixturevalue("emoji_shards")
        zero = "--parallel.deepspeed_config=ds_configs/zero2_cpu.json" if case.endswith("zero2") else ZERO3
        args = ["--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={shards}", zero,
                "--train.micro_batch_size=4", "--dvae.eval_batches=3", "--train.precision=bf16"]  # fmt: skip
    else:
        tokens, bpe = request.getfixturevalue("token_shards"), request.getfixturevalue("tokenizer_model")
        args = ["--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={tokens}",
                f"--tokenizer.model_path={bpe}", ZERO3, "--prior.eval_batches=3", "--optim.ema_decay=0.5",
                "--train.precision=fp16", "--train.grad_scaler=per_resblock"]  # fmt: skip
    check(run(tmp_path / "eval", True, args), args, tmp_path / "eval", case, rtol=1e-2)
