# Tether developer commands. `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck check bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the server with the embedded Redis and the demo application on 127.0.0.1:8000.
run: $(STAMP)
	$(BIN)/tether serve

## Run the whole test suite (starts its own redis-server processes on free ports).
test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

## Benchmarks: each prints Tether's figures beside a baseline measured in the same run.
bench: $(STAMP)
	$(BIN)/python bench/jwt_algorithms.py
	$(BIN)/python bench/auth.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
