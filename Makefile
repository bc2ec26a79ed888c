# Two commands do all the set-up: `make run` (the demo on the embedded stack) and `make test` (the suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint typecheck unit integration bench clean

setup: $(STAMP)

# torch first, pinned exactly: that takes the CPU wheel on local disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/memstream demo

lint: setup
	$(BIN)/ruff check schemas processors infra streams memstream tests
	$(BIN)/ruff format --check schemas processors infra streams memstream tests

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

test: setup lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests

bench: setup
	$(BIN)/memstream bench --quick

clean:
	rm -rf $(VENV) .memstream .pytest_cache .mypy_cache .ruff_cache
