# ERP event pipeline — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-unit test-integration bench lint fmt clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

run: $(STAMP) ## run the pipeline (embedded PostgreSQL and broker when none is configured)
	$(BIN)/pipeline up $(ARGS)

test: $(STAMP) ## run every test (unit + integration against real PostgreSQL and broker)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## unit tests only (no servers)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) ## integration tests only
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

bench: $(STAMP) ## relay benchmarks (JSON figures, baseline measured in the same run)
	$(BIN)/pipeline bench relay --events 50000 --json
	$(BIN)/pipeline bench relay --rate 1000 --seconds 20 --json

lint: $(STAMP) ## ruff + mypy (strict on pipeline/)
	$(BIN)/ruff check pipeline connectors tests
	$(BIN)/mypy

fmt: $(STAMP) ## format the code
	$(BIN)/ruff format pipeline connectors tests
	$(BIN)/ruff check --fix pipeline connectors tests

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
