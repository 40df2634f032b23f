# Set-up is idempotent: every target can be re-run on a fresh or a ready machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= jax opacus tf_privacy
PYTEST_ARGS ?=

.PHONY: setup envs data browser demo test ci-gate bench lint format clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,ray]'
	touch $@

data:
	bash scripts/ensure-data.sh

browser:
	bash scripts/ensure-browser.sh

envs: $(BIN)/.installed
	$(BIN)/bench env create $(BACKENDS)

setup: $(BIN)/.installed data envs browser

demo: setup
	$(BIN)/bench run quickstart
	$(BIN)/bench run quickstart --dry-run
	$(BIN)/bench report --suite quickstart --out reports/quickstart.html

test: setup
	BENCH_REQUIRE_BROWSER=1 $(BIN)/python -m pytest tests --ignore=tests/benchmarks -ra $(PYTEST_ARGS)

# The CI gate on its own (tests/integration/test_ci_gate.py runs it inside `make test`).
ci-gate: setup
	bash scripts/ci-gate.sh

# Micro-benchmarks (pytest-benchmark): the core's per-step work here, one DP step per backend in its own
# environment; JSON in $(BENCH_JSON), beside the results, where `bench compare` shows it.
BENCH_JSON ?= results/_benchmarks
bench: setup
	mkdir -p $(BENCH_JSON)
	$(BIN)/python -m pytest tests/benchmarks/test_core_step.py -p no:cacheprovider --benchmark-json=$(BENCH_JSON)/core.json
	for b in $(BACKENDS); do \
	  .envs/$$b/bin/python -m pip install -q --disable-pip-version-check pytest pytest-benchmark && \
	  PYTHONPATH=. .envs/$$b/bin/python -m pytest tests/benchmarks/test_backend_step.py tests/benchmarks/test_jax_kernels.py -p no:cacheprovider \
	    --benchmark-json=$(BENCH_JSON)/$$b.json || exit 1; \
	done

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .envs results .pytest_cache
