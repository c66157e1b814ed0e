# Two commands do all the set-up: `make sweep` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SWEEP ?= sweeps/fcn.toml
ARGS ?=
PYTEST_ARGS ?=
# The project's local MNIST copy, when the checkout has one beside it; else data.path, or the download.
ifneq ($(wildcard ../shared/data/mnist),)
export MNIST_SWEEP_DATA ?= $(abspath ../shared/data/mnist)
endif

.PHONY: sweep test lint ui install install-dev bench-overhead bench-epoch bench-memory bench-search

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

sweep: $(VENV)/.installed            ## run the default sweep (ARGS="--trials 3 --epochs 1" to shrink it)
	$(BIN)/mnist-sweep run $(SWEEP) $(ARGS)

test: $(VENV)/.installed-dev         ## the whole test suite, slow end-to-end tests included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check mnist_sweep tests bench
	$(BIN)/mypy
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
	$(BIN)/hadolint docker/Dockerfile

ui: $(VENV)/.installed               ## the MLflow UI on the default local store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts --host 127.0.0.1

bench-overhead: $(VENV)/.installed-dev   ## one trial against raw fit; tracking and start-up times
	$(BIN)/python bench/overhead.py

bench-epoch: $(VENV)/.installed-dev      ## epoch time against the arithmetic floor
	$(BIN)/python bench/epoch.py

bench-memory: $(VENV)/.installed-dev     ## worker RSS after 1 and after 20 trials
	$(BIN)/python bench/worker_memory.py --trials 20

bench-search: $(VENV)/.installed-dev     ## the default sweep, pruning off, random sampler (hours on 2 cores)
	$(BIN)/python bench/search.py
