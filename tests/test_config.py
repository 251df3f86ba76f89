from pathlib import Path

import pytest

from megadalle.config import ConfigError, JobConfig, dump_toml, load_config, write_resolved

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_papers():
    cfg = load_config([])
    assert cfg.tokenizer.vocab_size == 16384 and cfg.tokenizer.max_len == 256 and cfg.tokenizer.dropout == 0.1
    assert cfg.data.image_size == 256
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.999, 1e-8)


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    p = write(tmp_path, "[train]\nsteps = 7\nmicro_batch_size = 3\n[optim]\nlr = 0.5\n")
    cfg = load_config(["--train.steps=11", "--config", str(p), "--optim.beta2", "0.96"])
    assert cfg.train.steps == 11  # CLI beats TOML, wherever --config stands
    assert cfg.train.micro_batch_size == 3  # TOML beats default
    assert cfg.optim.lr == 0.5 and cfg.optim.beta2 == 0.96
    assert cfg.train.grad_accum_steps == JobConfig().train.grad_accum_steps  # default kept


def test_cli_types_lists_bools_literals():
    cfg = load_config(["--data.sources=twemoji,openmoji=/x", "--data.style_in_caption=false", "--train.precision=bf16"])
    assert cfg.data.sources == ["twemoji", "openmoji=/x"]
    assert cfg.data.style_in_caption is False
    assert cfg.train.precision == "bf16"
    assert load_config(["--train.activation_checkpointing"]).train.activation_checkpointing is True


def test_toml_int_accepted_for_float(tmp_path):
    assert load_config(["--config", str(write(tmp_path, "[optim]\nlr = 1\n"))]).optim.lr == 1.0


@pytest.mark.parametrize(
    "text, needles",
    [
        ("[train]\nstpes = 3\n", ["unknown config key 'train.stpes'", "run.toml", "steps"]),
        ("[trian]\nsteps = 3\n", ["unknown config section 'trian'", "run.toml"]),
        ('[train]\nsteps = "three"\n', ["train.steps", "expected an int", "run.toml"]),
        ("[train]\nsteps = true\n", ["train.steps", "bool"]),
        ('[train]\nprecision = "fp8"\n', ["train.precision", "fp8", "bf16"]),
        ("[data]\nsources = 3\n", ["data.sources", "expected a list"]),
        ("[train\nsteps = 3\n", ["malformed TOML", "run.toml"]),
        ("steps = 3\n", ["'steps' must be a [section] table"]),
        ("[data]\nimage_size = -4\n", ["data.image_size must be positive", "-4"]),
    ],
)
def test_toml_errors_name_key_and_file(tmp_path, text, needles):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(p)])
    for n in needles:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--train.stpes=3"], ["command line", "unknown config key 'train.stpes'"]),
        (["--train.steps=abc"], ["command line --train.steps", "expected an int", "'abc'"]),
        (["--optim.lr=fast"], ["optim.lr", "expected a float"]),
        (["--data.style_in_caption=maybe"], ["expected a bool"]),
        (["--steps=3"], ["--steps is not of the form --section.key"]),
        (["positional"], ["unexpected argument 'positional'"]),
        (["--config", "/nonexistent/run.toml"], ["config file not found: /nonexistent/run.toml"]),
    ],
)
def test_cli_errors(argv, needles):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(['--job.description=quote " and \\ back', "--data.sources=a,b", "--optim.lr=3e-4"])
    path = write_resolved(cfg, tmp_path / "run")
    assert path.read_text() == dump_toml(cfg)
    assert load_config(["--config", str(path)]) == cfg


@pytest.mark.parametrize("toml", sorted((REPO / "megadalle" / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_run_files_load(toml):
    load_config(["--config", str(toml)])


def test_dvae_paper_settings_are_the_defaults_and_the_run_file():
    """App. A.2: beta 6.6 over 5,000 updates, tau 1 -> 1/16 over 150,000, lr 1e-4 -> 1.25e-6 over 1.2M, AdamW
    weight decay 1e-4, EMA 0.999; batch 512."""
    from megadalle.engine.ds_config import load_ds_config

    for cfg in (load_config([]), load_config(["--config", str(REPO / "megadalle/configs/dvae_paper.toml")])):
        d, o = cfg.dvae, cfg.optim
        assert (d.kl_weight, d.kl_warmup_steps) == (6.6, 5000)
        assert (d.warm_start_steps, d.elb_lr_scale) == (0, 1.0)  # the paper has no warm start
        assert (d.tau_start, d.tau_end, d.tau_steps) == (1.0, 1 / 16, 150000)
        assert (o.lr, o.lr_min, d.lr_decay_steps) == (1e-4, 1.25e-6, 1200000)
        assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.ema_decay) == (0.9, 0.999, 1e-8, 1e-4, 0.999)
        assert cfg.model.dvae_flavor == "paper" and cfg.data.image_size == 256
    ds = load_ds_config(cfg, world_size=64)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        512,
        8,
        1,
    )


@pytest.mark.parametrize("flavor", ["12b", "1p3b"])
def test_prior_paper_run_files_resolve(flavor):
    """App. B.2: AdamW 0.9 / 0.96 / 1e-8, weight decay 4.5e-2, clip 4, warm-up 5,000 to 4.5e-4 then halved on
    plateaus 5 times, EMA every 25 updates at 0.99, batch 1,024."""
    from megadalle.engine.ds_config import grad_scaler_mode, load_ds_config
    from megadalle.engine.schedules import lr_schedule

    cfg = load_config(["--config", str(REPO / f"megadalle/configs/prior_{flavor}.toml")])
    o = cfg.optim
    assert cfg.job.stage == "prior" and cfg.model.prior_flavor == flavor
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == (0.9, 0.96, 1e-8, 0.045, 4.0)
    assert (o.lr, o.warmup_steps, o.schedule, o.max_halvings) == (4.5e-4, 5000, "plateau", 5)
    assert (o.ema_decay, o.ema_every) == (0.99, 25)
    assert (cfg.tokenizer.vocab_size, cfg.tokenizer.max_len, cfg.tokenizer.dropout) == (16384, 256, 0.1)
    assert cfg.train.activation_checkpointing and cfg.train.global_batch_size == 1024
    for world in (1024 // cfg.train.micro_batch_size, 64, 8):
        ds = load_ds_config(cfg, world_size=world)
        assert ds["train_batch_size"] == 1024 and ds["zero_optimization"]["stage"] == 3
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == 1024
        assert ds["gradient_clipping"] == 4.0 and "fp16" not in ds  # fp16 with per-resblock scaling: autocast
        assert ds["torch_autocast"]["dtype"] == "torch.float16" and grad_scaler_mode(cfg, ds) == "per_resblock"
    s = lr_schedule(cfg, cfg.prior.lr_decay_steps)
    assert s.lr(0) == pytest.approx(4.5e-4 / 5000) and s.lr(4999) == pytest.approx(4.5e-4) and s.lr(10**5) == 4.5e-4


def test_global_batch_size_must_divide():
    from megadalle.engine.ds_config import load_ds_config

    cfg = load_config(["--train.global_batch_size=100", "--train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size=100 is not a multiple of .*8 x 2 ranks"):
        load_ds_config(cfg, world_size=2)


def test_help_lists_every_key_with_type_default_and_docstring(capsys):
    """`--help [SECTION]` prints the settings from the dataclasses themselves: every key of every section with its
    type, default and docstring (rule 1: none undocumented), and exits 0 as argparse does; a bad section is named."""
    import dataclasses

    from megadalle.config import config_help

    with pytest.raises(SystemExit) as e:
        load_config(["--config", "megadalle/configs/dvae_debug.toml", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "(undocumented)" not in text
    for section in dataclasses.fields(JobConfig):
        assert f"[{section.name}]" in text
        for f in dataclasses.fields(getattr(JobConfig(), section.name)):
            assert f"  --{section.name}.{f.name}  (" in text, (section.name, f.name)
    assert "--checkpoint.async_save  (bool, default false)\n      Write checkpoints in a background thread" in text
    one = config_help("data")
    assert "[data]" in one and "[train]" not in one and "--data.image_size  (int, default 256)" in one
    with pytest.raises(ConfigError, match=r"--help nope: no such section \(sections: job, data,"):
        config_help("nope")


def test_train_py_help_from_the_command_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "megadalle/train.py", "--help", "optim"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "[optim]" in proc.stdout and "--optim.lr  (" in proc.stdout, proc.stderr
    assert "[train]" not in proc.stdout and not proc.stderr
