import json
from pathlib import Path

import pytest

from megadalle.config import ConfigError, load_config
from megadalle.engine.ds_config import fill_ds_config, load_ds_config
from tests.conftest import torchrun

REPO = Path(__file__).resolve().parents[2]


def cfg(*argv: str):
    return load_config(list(argv))


def test_auto_values_filled_from_jobconfig():
    c = cfg("--train.micro_batch_size=3", "--train.grad_accum_steps=2", "--optim.grad_clip=4", "--train.precision=bf16")
    ds = load_ds_config(c, world_size=4, path=REPO / "ds_configs" / "zero3_cpu.json")
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 4.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3  # DeepSpeed's own values untouched


def test_optimizer_params_filled_and_missing_keys_added():
    c = cfg("--optim.lr=3e-4", "--optim.beta2=0.96", "--optim.weight_decay=0.045")
    ds = fill_ds_config({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}}}, c, 1)
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.96], "eps": 1e-8, "weight_decay": 0.045}
    assert ds["train_micro_batch_size_per_gpu"] == c.train.micro_batch_size
    assert "fp16" not in ds and "bf16" not in ds  # not needed in fp32


def test_agreeing_explicit_value_is_fine():
    ds = fill_ds_config({"gradient_clipping": 1.0}, cfg("--optim.grad_clip=1"), 1)
    assert ds["gradient_clipping"] == 1.0


@pytest.mark.parametrize(
    "ds, argv, needles",
    [
        ({"gradient_clipping": 2.0}, ["--optim.grad_clip=1"], ["'gradient_clipping' is 2.0", "optim.grad_clip"]),
        ({"train_micro_batch_size_per_gpu": 16}, [], ["train_micro_batch_size_per_gpu", "train.micro_batch_size"]),
        ({"train_batch_size": 9}, [], ["train_batch_size", "world_size(2)"]),
        ({"fp16": {"enabled": True}}, ["--train.precision=bf16"], ["'fp16.enabled' is True", "train.precision"]),
        ({"optimizer": {"params": {"lr": 0.1}}}, ["--optim.lr=1e-4"], ["optimizer.params.lr", "optim.lr"]),
    ],
)
def test_conflicting_explicit_value_rejected(tmp_path, ds, argv, needles):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        load_ds_config(cfg(*argv), world_size=2, path=path)
    for n in needles + ["bad.json", '"auto"']:
        assert n in str(e.value), str(e.value)


def test_fp16_on_zero0_refused_naming_the_file():
    """DeepSpeed 0.19.8's ZeRO-0 fp16 optimizer divides by a loss scale the loss was never multiplied by (its
    updates and the logged gradient norm would be off by 2^16): refused, while fp16 on ZeRO 1-3 and bf16 on ZeRO-0
    and fp16 on ZeRO-0 without loss scaling (train.grad_scaler = none, a static scale of 1: right there) are filled."""
    with pytest.raises(ConfigError, match=r"zero0_cpu.json: train.precision = fp16 with zero_optimization.stage = 0"):
        load_ds_config(cfg("--train.precision=fp16"), world_size=1, path=REPO / "ds_configs" / "zero0_cpu.json")
    assert load_ds_config(cfg("--train.precision=bf16"), 1, REPO / "ds_configs" / "zero0_cpu.json")["bf16"]["enabled"]
    unscaled = load_ds_config(
        cfg("--train.precision=fp16", "--train.grad_scaler=none"), 1, REPO / "ds_configs" / "zero0_cpu.json"
    )
    assert unscaled["fp16"]["loss_scale"] == 1
    for stage in (1, 2):
        ds = load_ds_config(cfg("--train.precision=fp16"), 1, REPO / "ds_configs" / f"zero{stage}_cpu.json")
        assert ds["fp16"]["enabled"]


def test_malformed_and_missing_json(tmp_path):
    (tmp_path / "x.json").write_text("{oops")
    with pytest.raises(ConfigError, match="x.json: malformed JSON"):
        load_ds_config(cfg(), 1, tmp_path / "x.json")
    with pytest.raises(ConfigError, match="DeepSpeed config not found"):
        load_ds_config(cfg(), 1, tmp_path / "nope.json")


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_ds_configs_mark_owned_values_auto(path):
    ds = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", f'{path.name}: {key} must be "auto"'
    for prec in ("fp16", "bf16"):
        assert ds[prec]["enabled"] == "auto"
    for precision in ("fp32", "bf16", "fp16"):
        scaler = ["--train.grad_scaler=none"] if precision == "fp16" and ds["zero_optimization"]["stage"] == 0 else []
        load_ds_config(cfg(f"--train.precision={precision}", *scaler), 8, path)  # (test_fp16_on_zero0_refused...)


WORKER = """
import os, torch, deepspeed, torch.distributed as dist
from megadalle.config import load_config
from megadalle.engine.ds_config import load_ds_config
cfg = load_config(["--parallel.deepspeed_config=ds_configs/zero3_cpu.json", "--train.micro_batch_size=2",
                   "--train.grad_accum_steps=1", "--optim.grad_clip=1.5"])
ds = load_ds_config(cfg, int(os.environ["WORLD_SIZE"]))
torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=ds)
assert engine.train_micro_batch_size_per_gpu() == 2 and engine.train_batch_size() == 4
assert engine.gradient_clipping() == 1.5 and engine.zero_optimization_stage() == 3
loss = engine(torch.randn(2, 8)).square().mean()
engine.backward(loss)
engine.step()
open(os.path.join(os.environ["OUT"], f"rank{dist.get_rank()}.ok"), "w").close()  # per-rank files, not printed lines
dist.barrier()
os._exit(0)
"""


@pytest.mark.distributed
def test_filled_config_accepted_by_deepspeed_zero3_two_processes(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    monkeypatch.setenv("OUT", str(tmp_path))
    proc = torchrun(script, nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]
