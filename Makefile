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

.PHONY: sweep test test-fast lint ui dashboard install install-dev bench-overhead bench-epoch bench-memory bench-search bench-backends bench-gpu bench-packing

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml   # jax (CPU): the tests run one sweep under JAX
	$(BIN)/python -m pip install -q -e ".[dev,jax,dashboard]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

sweep: $(VENV)/.installed            ## run the default sweep (ARGS="--trials 3 --epochs 1" to shrink it)
	$(BIN)/mnist-sweep run $(SWEEP) $(ARGS)

# Two pytest processes, a test file each (module fixtures stay one per file): the suite spends much of its time
# in single-threaded start-ups and waits, so on 2 cores it took 13.2 min against 19.7 min in one process
# (2026-12-07, AMD EPYC, 925 tests). TEST_WORKERS=0 runs it in this process alone (for a debugger).
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev         ## the whole test suite, slow end-to-end tests included
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The markers are registered, and said what they mean, in pyproject.toml ([tool.pytest.ini_options]).
FAST_TESTS := not slow and not subprocess and not server and not browser
test-fast: $(VENV)/.installed-dev    ## in-process config, bad-input and unit tests (minutes): no slow, subprocess, server or browser test
	$(BIN)/python -m pytest -m "$(FAST_TESTS)" $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check mnist_sweep tests bench
	$(BIN)/mypy
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
	$(BIN)/hadolint docker/Dockerfile

ui: $(VENV)/.installed               ## the MLflow UI on the sweep's runs table, at 127.0.0.1:5000
	$(BIN)/mnist-sweep ui $(SWEEP) $(ARGS)

dashboard: $(VENV)/.installed        ## optuna-dashboard on the sweep's study, at 127.0.0.1:8080
	$(BIN)/python -m pip install -q -e ".[dashboard]"
	$(BIN)/mnist-sweep dashboard $(SWEEP) $(ARGS)

bench-overhead: $(VENV)/.installed-dev   ## one trial against raw fit; tracking and start-up times
	$(BIN)/python bench/overhead.py

bench-epoch: $(VENV)/.installed-dev      ## epoch time against the arithmetic floor
	$(BIN)/python bench/epoch.py

bench-memory: $(VENV)/.installed-dev     ## worker RSS after 1 and after 20 trials
	$(BIN)/python bench/worker_memory.py --trials 20

bench-backends: $(VENV)/.installed-dev  ## epoch time of the default trial per Keras backend (torch: pip install torch)
	$(BIN)/python bench/backends.py

bench-gpu: $(VENV)/.installed-dev       ## on a GPU machine: epoch time by batch size, 1-8 workers on one GPU
	$(BIN)/python bench/gpu.py

bench-packing: $(VENV)/.installed-dev   ## 1 process on all cores against 1 per core, batch 64/128/256
	$(BIN)/python bench/packing.py

bench-search: $(VENV)/.installed-dev     ## the default sweep, pruning off, random sampler (hours on 2 cores)
	$(BIN)/python bench/search.py
