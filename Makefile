# AXL Mesh. `make test`, `make up`, `make bench`: each installs what is missing first (`make install` forces it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Stamp of a complete install of the project and its extras; stale when pyproject.toml changes.
INSTALLED := $(VENV)/.installed
EXTRAS ?= dev,eval,llama
# Two cores on the reference machine: one intra-op thread per core.
export OMP_NUM_THREADS ?= 2

.PHONY: help install test test-fast bench up data eval lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# llama-cpp-python compiles llama.cpp for any x86-64 with AVX2 rather than for this host (-march=native): a native build
# on a CPU with AMX (Intel Sapphire Rapids, seen on a 2-core VM here) crashes inside llama.cpp's Q4_K decode. pip's
# wheel cache ignores CMAKE_ARGS, so the install skips it, or a wheel built natively before would come back.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

# The stamp is written only after pip succeeds: an interrupted install is redone by the next target that needs it.
$(INSTALLED): pyproject.toml | $(PY)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -e '.[$(EXTRAS)]' --no-cache-dir
	touch $@

install:  ## create .venv and install the project with every extra, again if done (builds llama.cpp for AVX2 each time: ~6-15 min)
	rm -f $(INSTALLED)
	$(MAKE) --no-print-directory $(INSTALLED)

# `make lint` first: a lint or type error fails `make test` (and so CI, which runs it) before the suite starts.
test: lint  ## lint (ruff, mypy), then run the whole test suite
	$(PY) -m pytest -q tests

test-fast: $(INSTALLED)  ## the model library's tests only
	$(PY) -m pytest -q tests/axl_model

# What `make lint` checks: the torch-free library and the services (shared/axl_model is the model library's own).
LINT_PATHS ?= shared/axl_mesh services
lint: $(INSTALLED)  ## ruff (lint + format check) and mypy on shared/axl_mesh and services (config in pyproject.toml)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy $(LINT_PATHS)

bench: $(INSTALLED)  ## measure speed and quality (minutes); prints figures and ratios
	$(PY) -m bench

# --exit-with-parent: killing make (or its terminal) stops the mesh rather than leaving it running unseen. `exec`
# keeps the launcher make's own child (no shell between them), whatever the recipe grows into.
up: $(INSTALLED)  ## run the mesh as local processes (gateway :8880, registry :8900, workers :8901+)
	exec $(PY) -m deploy.launcher --config deploy/mesh.yaml --exit-with-parent

data: $(INSTALLED)  ## build the specialists' training data from the local standard library
	$(VENV)/bin/axl data build --all

# Schemathesis against the gateway's schema on a real mesh: FUZZ_EXAMPLES cases per operation and per seed.
FUZZ_EXAMPLES ?= 200
FUZZ_SEEDS ?= 1,2,3,4,5
.PHONY: fuzz
fuzz: $(INSTALLED)  ## fuzz the gateway's API (schemathesis, stateful too): many more cases than make test
	AXL_TEST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) AXL_TEST_FUZZ_SEEDS=$(FUZZ_SEEDS) \
		$(PY) -m pytest -q -p no:cacheprovider tests/services/api_gateway/test_fuzz.py

EVAL_CHECKPOINT ?= checkpoints/axl-micro
eval: $(INSTALLED)  ## evaluate a checkpoint: held-out bits/byte, HumanEval (sandboxed), docs/fixer checks -> docs/results.md
	$(VENV)/bin/axl eval $(EVAL_CHECKPOINT) --humaneval --tasks docs,fixer --task-limit 50 --out docs/results.md

clean:  ## remove caches (keeps .venv and checkpoints)
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -rf .pytest_cache .hypothesis .mypy_cache .ruff_cache
