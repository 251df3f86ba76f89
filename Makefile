# megadalle: `make demo` runs the main job on its embedded default, `make test` runs the whole suite.
# Both set up everything on a fresh machine: Debian packages (as root), .venv, requirements, the package.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
DEMO_CONFIG ?= megadalle/configs/demo.toml
PYTEST_ARGS ?=
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup sysdeps demo test lint format clean debug-data bench-dvae bench-sampling

setup: sysdeps $(STAMP)

sysdeps:
	@bash tools/install_sysdeps.sh

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

DVAE_CONFIG ?= megadalle/configs/dvae_small.toml
PRIOR_CONFIG ?= megadalle/configs/prior_small.toml
CLIP_CONFIG ?= megadalle/configs/clip_small.toml

demo: setup
	$(PY) tools/make_shards.py --config $(DEMO_CONFIG)
	$(PY) tools/train_tokenizer.py --config $(DEMO_CONFIG)
	$(PY) megadalle/train.py --config $(DVAE_CONFIG)
	$(PY) tools/encode_shards.py --checkpoint outputs/dvae_small/checkpoints --out outputs/demo/tokens --augmentations 4
	$(PY) megadalle/train.py --config $(PRIOR_CONFIG)
	$(PY) megadalle/train.py --config $(CLIP_CONFIG)
	$(PY) megadalle/sample.py --prior outputs/prior_small/checkpoints --dvae outputs/dvae_small/checkpoints \
		--clip outputs/clip_small/checkpoints --captions-file megadalle/configs/demo_captions.txt \
		--candidates 8 --keep 4 --out outputs/demo/samples
	$(PY) tools/demo_report.py --prior outputs/prior_small/checkpoints --dvae outputs/dvae_small/checkpoints \
		--clip outputs/clip_small/checkpoints --shards outputs/demo/shards --out outputs/demo/report.json
	@echo "demo: done. shards, tokenizer, tokens, samples (samples.png, scores.json) and report.json under outputs/demo/;"
	@echo "      runs (config.toml, metrics.jsonl, images/, checkpoints/) under outputs/{dvae,prior,clip}_small/"

bench-sampling: setup
	$(PY) tools/bench_sampling.py

# Small data for the debug run files (dvae_debug, prior_debug, clip_debug) under outputs/debug/, ~1 minute.
debug-data: setup
	$(PY) tools/make_shards.py --config megadalle/configs/debug_cpu.toml
	$(PY) tools/train_tokenizer.py --config megadalle/configs/debug_cpu.toml
	$(PY) megadalle/train.py --config megadalle/configs/dvae_debug.toml --train.eval_every=0
	$(PY) tools/encode_shards.py --checkpoint outputs/dvae_debug/checkpoints --out outputs/debug/tokens

bench-dvae: setup
	$(PY) tools/bench_dvae.py

test: setup
	$(VENV)/bin/ruff check --quiet .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf outputs build .pytest_cache
