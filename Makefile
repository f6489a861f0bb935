# AXL Mesh. `make install` once, then `make test`, `make up`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= dev,eval,llama
# Two cores on the reference machine: one intra-op thread per core.
export OMP_NUM_THREADS ?= 2

.PHONY: help install test test-fast bench up data eval lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

install: $(PY)  ## create .venv and install the project with every extra (builds llama.cpp: ~15 min the first time)
	$(PIP) install -e '.[$(EXTRAS)]'

test:  ## run the whole test suite
	$(PY) -m pytest -q tests

test-fast:  ## the model library's tests only
	$(PY) -m pytest -q tests/axl_model

bench:  ## measure speed and quality (minutes); prints figures and ratios
	$(PY) -m bench

up:  ## run the mesh as local processes (gateway :8880, registry :8900, workers :8901+)
	$(PY) -m deploy.launcher --config deploy/mesh.yaml

data:  ## build the specialists' training data from the local standard library
	$(VENV)/bin/axl data build --all

EVAL_CHECKPOINT ?= checkpoints/axl-micro
eval:  ## evaluate a checkpoint: held-out bits/byte, HumanEval (sandboxed), docs/fixer checks -> docs/results.md
	$(VENV)/bin/axl eval $(EVAL_CHECKPOINT) --humaneval --tasks docs,fixer --task-limit 50 --out docs/results.md

clean:  ## remove caches (keeps .venv and checkpoints)
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -rf .pytest_cache .hypothesis
