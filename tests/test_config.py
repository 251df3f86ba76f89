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
