"""engine/progress.py: when the training bar shows (logging.progress auto / on / off, rank 0 only), what it shows,
and that log lines go above it; and a real train.py run's console with the bar on."""

import io
import logging
import subprocess
import sys

import pytest

from megadalle.config import ConfigError, load_config
from megadalle.engine.progress import Progress, progress_enabled
from tests.conftest import REPO, python


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_modes_rank_and_terminal():
    tty, pipe = Terminal(), io.StringIO()
    assert progress_enabled("auto", 0, tty) and not progress_enabled("auto", 0, pipe)
    assert progress_enabled("on", 0, pipe) and progress_enabled("on", 0, tty)
    assert not progress_enabled("off", 0, tty) and not progress_enabled("off", 0, pipe)
    assert not progress_enabled("on", 1, tty) and not progress_enabled("auto", 3, tty)  # rank 0 only
    with pytest.raises(ValueError, match="logging.progress"):
        progress_enabled("sometimes", 0, tty)


def test_config_key():
    assert load_config([]).logging.progress == "auto"
    assert load_config(["--logging.progress=off"]).logging.progress == "off"
    with pytest.raises(ConfigError, match="logging.progress"):
        load_config(["--logging.progress=sometimes"])


def test_bar_shows_steps_eta_and_loss_and_log_lines_go_above_it(capsys):
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stdout)  # as setup_logging's basicConfig(stream=sys.stdout)
    root.addHandler(console)
    try:
        bar_out = io.StringIO()
        with Progress("on", total=10, initial=2, desc="dvae test", stream=bar_out) as bar:
            assert bar.enabled
            assert console not in root.handlers  # replaced by a handler that writes with tqdm.write
            bar.update(3, loss=0.125)
            logging.getLogger("megadalle").warning("a readable line")
            bar.update(4, loss=0.0625)
        assert console in root.handlers  # restored
        text = bar_out.getvalue()
        assert "dvae test" in text and "4/10" in text and "loss=0.0625" in text
        assert "<" in text  # tqdm's [elapsed<remaining]
        assert "a readable line" in capsys.readouterr().out
    finally:
        root.removeHandler(console)


def test_off_and_other_ranks_show_nothing():
    root_handlers = list(logging.getLogger().handlers)
    for mode, rank in (("off", 0), ("on", 1), ("auto", 0)):
        out = io.StringIO()  # not a terminal: auto is off
        with Progress(mode, total=5, rank=rank, stream=out) as bar:
            assert not bar.enabled
            bar.update(1, loss=1.0)
            assert logging.getLogger().handlers == root_handlers
        assert out.getvalue() == ""


@pytest.mark.slow
def test_train_console_with_the_bar(emoji_shards, tmp_path):
    """train.py with the bar on: the bar on stderr, readable lines intact on stdout, none of DeepSpeed's start-up
    lines (the accelerator warning, the shm op's build message)."""
    proc = subprocess.run(
        [python(), "megadalle/train.py", "--config", "megadalle/configs/dvae_debug.toml",
         f"--data.shards={emoji_shards}", f"--job.run_root={tmp_path}", "--train.steps=3", "--train.log_every=1",
         "--train.eval_every=0", "--logging.progress=on"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3/3" in proc.stderr and "loss=" in proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split("INFO ")[1].split(":")[0] for ln in lines if "INFO train step" in ln] == [
        f"train step {i}" for i in (1, 2, 3)
    ]
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    assert "built successfully" not in proc.stdout + proc.stderr
