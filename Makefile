# Set-up is idempotent: every target can be re-run on a fresh or a ready machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= jax opacus tf_privacy
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: much of the suite waits on subprocesses or compiles single-threaded, so
# three keep a 2-core machine busy (tests/conftest.py says which files start first).
TEST_WORKERS ?= 3

.PHONY: setup envs data browser debs demo test ci-gate bench lint format clean

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

# Debian's packages, one apt at a time (not as prerequisites, which `make -j` would run side by side).
debs:
	bash scripts/ensure-data.sh
	bash scripts/ensure-browser.sh

# One `bench env create` per backend, side by side (pip spends much of its time waiting on downloads and disk).
envs: $(BIN)/.installed
	@pids=""; for b in $(BACKENDS); do $(BIN)/bench env create $$b & pids="$$pids $$!"; done; \
	status=0; for p in $$pids; do wait $$p || status=1; done; exit $$status

# The environments (pip) and Debian's packages (apt) are made side by side.
setup:
	$(MAKE) --no-print-directory -j2 envs debs

demo: setup
	$(BIN)/bench run quickstart
	$(BIN)/bench run quickstart --dry-run
	$(BIN)/bench report --suite quickstart --out reports/quickstart.html

test: setup
	BENCH_REQUIRE_BROWSER=1 $(BIN)/python -m pytest tests --ignore=tests/benchmarks -ra \
	  -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

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
