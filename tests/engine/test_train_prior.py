"""The prior on DeepSpeed ZeRO-3 with real processes."""

import json
import subprocess

import pytest
import torch

from tests.conftest import REPO, python, torchrun

pytestmark = pytest.mark.distributed

WORKER = """
import os, sys, torch, deepspeed, torch.distributed as dist
from megadalle.config import load_config
from megadalle.engine.ds_config import load_ds_config
from megadalle.engine.wrap import apply_activation_checkpointing
from megadalle.models.transformer import FLAVORS, DallePrior

if "RANK" not in os.environ:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = load_config(["--config", "megadalle/configs/prior_debug.toml", f"--train.micro_batch_size={4 // world}"])
ds = load_ds_config(cfg, world)
ds["zero_allow_untested_optimizer"] = True  # SGD, for the comparison below
a = FLAVORS["debug"]
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = DallePrior(a)
apply_activation_checkpointing(model)
# SGD: parameters move by lr x gradient, so they compare the gradients themselves; Adam's first step,
# lr x g / (|g| + eps), would magnify rounding differences of near-zero gradients into lr-sized ones
opt = torch.optim.SGD(model.parameters(), lr=0.5)
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    init = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
g = torch.Generator().manual_seed(1)
text = torch.randint(4, a.text_vocab, (4, a.text_len), generator=g)  # full captions: equal token counts per rank
image = torch.randint(0, a.image_vocab, (4, a.grid ** 2), generator=g)
per = 4 // world
sl = slice(rank * per, (rank + 1) * per)
out = engine(text[sl], image[sl])
engine.backward(out.loss)
engine.step()
loss = out.loss.detach().clone()
dist.all_reduce(loss)
params = list(engine.module.parameters())
with deepspeed.zero.GatheredParameters(params):
    state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
if rank == 0:
    torch.save({"loss": loss.item() / world, "state": state, "init": init}, sys.argv[1])
dist.barrier()
dist.destroy_process_group()
"""


def test_zero3_two_processes_match_one_process(tmp_path):
    from tests.conftest import free_port

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    one = subprocess.run([python(), str(script), str(tmp_path / "one.pt"), str(free_port())], cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(script, nproc=2, args=[str(tmp_path / "two.pt"), "0"], timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["state"].keys() == b["state"].keys()
    init = a["init"]
    for name, p in a["state"].items():
        torch.testing.assert_close(b["state"][name], p, rtol=1e-4, atol=1e-6)
    moved = [n for n, p in a["state"].items() if not torch.equal(p, init[n])]
    assert len(moved) > len(init) // 2, "the step changed the parameters"


def test_train_py_prior_two_processes(tmp_path, token_shards, tokenizer_model):
    args = [
        "--config", "megadalle/configs/prior_debug.toml", f"--prior.tokens={token_shards}",
        f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={tmp_path}", "--train.steps=3",
        "--train.eval_every=3", "--train.activation_checkpointing=true",
    ]  # fmt: skip
    proc = torchrun(REPO / "megadalle" / "train.py", nproc=2, args=args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "prior_debug" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    for key in ("text_loss", "image_loss", "tokens_per_s", "samples_per_s", "tflops", "grad_norm", "lr", "memory_mb"):
        assert all(isinstance(m[key], (int, float)) for m in train), key
    assert train[0]["lr"] == pytest.approx(1e-3 / 2)  # linear warm-up over 2 updates
    assert train[0]["image_loss"] == pytest.approx(5.55, abs=0.6)  # ~ln(256) at initialisation
    evals = [m for m in lines if m["kind"] == "eval"]
    assert evals and {"val_image_loss", "zeroshot_image_loss"} <= set(evals[0])
    assert "world 2, ZeRO 3" in proc.stdout


def test_mismatched_tokens_and_flavor_is_a_clear_error(tmp_path, token_shards, tokenizer_model):
    proc = subprocess.run(
        [python(), "megadalle/train.py", "--config", "megadalle/configs/prior_small.toml",
         f"--prior.tokens={token_shards}", f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "has 8x8 grids of 256 codes but model.prior_flavor=small takes 8x8 of 1024" in proc.stdout + proc.stderr


def test_prior_encodes_images_on_the_fly_with_a_frozen_dvae(tmp_path, emoji_shards, tokenizer_model, dvae_checkpoint):
    proc = subprocess.run(
        [python(), "megadalle/train.py", "--config", "megadalle/configs/prior_debug.toml",
         f"--model.dvae_checkpoint={dvae_checkpoint}", f"--data.shards={emoji_shards}",
         f"--tokenizer.model_path={tokenizer_model}", f"--job.run_root={tmp_path}", "--train.steps=2",
         "--train.eval_every=2", "--parallel.deepspeed_config=ds_configs/zero0_cpu.json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "prior_debug" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["kind"] == "train"] == [1, 2]
    assert any("val_image_loss" in m for m in lines if m["kind"] == "eval")
    # resumed (its data position restored through the frozen dVAE's image stream) to 3 updates
    proc = subprocess.run(proc.args[:-3] + ["--train.steps=3", *proc.args[-2:]], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data position" not in proc.stdout + proc.stderr  # it applied
    lines = [json.loads(x) for x in (tmp_path / "prior_debug" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["kind"] == "train"] == [1, 2, 3]
