# Set-up is idempotent: every target can be re-run on a fresh or a ready machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= jax opacus tf_privacy
PYTEST_ARGS ?=

.PHONY: setup envs data demo test lint format clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

data:
	bash scripts/ensure-data.sh

envs: $(BIN)/.installed
	$(BIN)/bench env create $(BACKENDS)

setup: $(BIN)/.installed data envs

demo: setup
	$(BIN)/bench run quickstart
	$(BIN)/bench run quickstart --dry-run

test: setup
	$(BIN)/python -m pytest tests --ignore=tests/benchmarks -ra $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .envs results .pytest_cache
