"""The dVAE on DeepSpeed with real processes: ZeRO-3 on 2 ranks, train.py end to end, resume, precisions."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, python, torchrun

pytestmark = pytest.mark.distributed

WORKER = """
import hashlib, os, sys, torch, deepspeed, torch.distributed as dist
from pathlib import Path
sys.path.insert(0, os.getcwd())  # the repository (torchrun's cwd): `tests` is not installed
from megadalle.config import load_config
from megadalle.engine.ds_config import load_ds_config
from megadalle.engine.ema import ShardedEMA
from megadalle.stages.dvae import DVAEStage
from megadalle.train import train_update
from tests.engine.gather import gathered_ema

deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config(["--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={sys.argv[1]}",
                   "--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--train.micro_batch_size=4"])
ds = load_ds_config(cfg, dist.get_world_size())
ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every parameter
torch.manual_seed(0)
stage = DVAEStage(cfg)
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = stage.build_model()
opt = torch.optim.AdamW(stage.param_groups(model), lr=1e-3)
engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
ema0, ema = ShardedEMA(engine.module, 0.0), ShardedEMA(engine.module, 0.9)
assert all(hasattr(p, "ds_tensor") for p in engine.module.parameters())
batches = stage.batches(dist.get_rank())
for step in range(3):
    train_update(engine, opt, stage, [next(batches)], stage.schedules(step))
    ema0.update(); ema.update()
params = list(engine.module.parameters())
with deepspeed.zero.GatheredParameters(params):
    full = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
digest = hashlib.sha256(b"".join(full[n].numpy().tobytes() for n in sorted(full))).hexdigest()
e0 = gathered_ema(ema0)
assert all(torch.equal(e0[n], full[n]) for n in full), "EMA with decay 0 must equal the gathered parameters"
assert any(not torch.equal(gathered_ema(ema)[n], full[n]) for n in full)
state = gathered_ema(ema)
for n, t in state.items():  # whole tensors in, each rank keeps its slice
    ema.load_whole(n, t + 1)
back = gathered_ema(ema)
assert all(torch.allclose(back[n], state[n] + 1) for n in state), "EMA load/gather round trip"
Path(sys.argv[2], f"rank{dist.get_rank()}.txt").write_text(digest)  # per-rank files: printed lines could interleave
dist.barrier()
dist.destroy_process_group()
"""


def test_zero3_two_ranks_identical_parameters_and_sharded_ema(tmp_path, emoji_shards):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = torchrun(script, nproc=2, args=[str(emoji_shards), str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1], digests


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_py_zero3_two_processes_then_resume(tmp_path, emoji_shards):
    base = [
        "--config", "megadalle/configs/dvae_debug.toml", f"--data.shards={emoji_shards}",
        f"--job.run_root={tmp_path}", "--deepspeed_config", "ds_configs/zero3_cpu.json",
        "--train.micro_batch_size=4", "--train.eval_every=4", "--checkpoint.every=2", "--checkpoint.keep=2",
    ]  # fmt: skip
    script = REPO / "megadalle" / "train.py"
    proc = torchrun(script, nproc=2, args=base + ["--train.steps=4"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "dvae_debug"
    metrics = read_metrics(run)
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for key in ("loss", "recon_nats", "kl_nats", "tau", "beta", "lr", "images_per_s", "grad_norm"):
        assert all(isinstance(m[key], float) for m in train), key
    assert train[0]["images_per_s"] > 0 and train[0]["tau"] == 1.0 and train[0]["beta"] == 0.0
    assert len(evals) == 1 and evals[0]["step"] == 4
    for key in ("elb_relaxed_nats_per_dim", "elb_hard_nats_per_dim", "mse", "psnr_db", "codebook_used_fraction",
                "codebook_perplexity"):  # fmt: skip
        assert key in evals[0]
    assert (run / "images" / "recon_step00000004.png").is_file()
    assert (run / "config.toml").is_file() and json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 8
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000002", "step_00000004"]
    assert "train step 4" in proc.stdout  # the readable rank-0 line

    proc = torchrun(script, nproc=2, args=base + ["--train.steps=6", "--checkpoint.resume=latest"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    steps = [m["step"] for m in read_metrics(run) if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000004", "step_00000006"], "keep=2 prunes the oldest"


@pytest.mark.parametrize(
    "ds_config, precision",
    [("zero0_cpu.json", "bf16"), ("zero1_cpu.json", "fp32"), ("zero2_cpu.json", "bf16"), ("zero3_cpu.json", "bf16")],
)
def test_train_py_each_zero_stage_and_precision(tmp_path, emoji_shards, ds_config, precision):
    proc = subprocess.run(
        [python(), "megadalle/train.py", "--config", "megadalle/configs/dvae_debug.toml",
         f"--data.shards={emoji_shards}", f"--job.run_root={tmp_path}",
         f"--parallel.deepspeed_config=ds_configs/{ds_config}",
         f"--train.precision={precision}", "--train.steps=2", "--train.eval_every=0", "--train.micro_batch_size=4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = [m for m in read_metrics(tmp_path / "dvae_debug") if m["kind"] == "train"]
    assert len(train) == 2 and all(m["loss"] == m["loss"] for m in train), "finite losses"


def test_deepspeed_launcher_two_processes(tmp_path, emoji_shards):
    from tests.conftest import free_port

    launcher = Path(python()).parent / "deepspeed"  # the launcher ships in the venv, next to python
    proc = subprocess.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "megadalle/train.py",
         "--deepspeed_config", "ds_configs/zero3_cpu.json", "--config", "megadalle/configs/dvae_debug.toml",
         f"--data.shards={emoji_shards}", f"--job.run_root={tmp_path}", "--train.steps=2", "--train.eval_every=0",
         "--train.micro_batch_size=4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2, ZeRO 3" in proc.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "dvae_debug") if m["kind"] == "train"] == [1, 2]
