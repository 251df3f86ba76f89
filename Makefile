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

.PHONY: setup sysdeps demo test lint format clean debug-data bench-dvae bench-sampling bench-attention compile-kernels

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

# QUICK=1: a smoke run of every stage in a few minutes, under outputs/demo_quick/ and runs named *_quick.
# FORCE=1: rerun every stage (otherwise stages whose outputs are complete and up to date are skipped).
demo: setup
	$(PY) tools/demo.py $(if $(filter-out 0,$(QUICK)),--quick) $(if $(filter-out 0,$(FORCE)),--force) \
		--demo-config $(DEMO_CONFIG) --dvae-config $(DVAE_CONFIG) --prior-config $(PRIOR_CONFIG) \
		--clip-config $(CLIP_CONFIG)

bench-sampling: setup
	$(PY) tools/bench_sampling.py

bench-attention: setup
	$(PY) tools/bench_attention.py --cpu

# Every Triton kernel configuration that training and tools/gpu_check.sh launch, compiled for sm_90 (H100/H200) on
# the CPU: shared memory, registers and spills per variant; fails on a compile error or too much shared memory.
compile-kernels: setup
	$(PY) tools/compile_kernels.py

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
