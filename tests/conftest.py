"""Settings for the whole test run, and the order in which pytest-xdist hands out its files (`make test`)."""

from __future__ import annotations

import signal

import pytest

# A shell without job control (a script's `make test &`) starts background commands with SIGINT ignored, and
# child processes inherit that: the `bench run` processes whose Ctrl-C handling tests check would then never see
# it. A Python handler, unlike SIG_IGN, is reset to the default at exec, so the children get Ctrl-C again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# `make test` runs pytest-xdist with `--dist loadfile --no-loadscope-reorder`: each file goes whole to one worker
# (module and session fixtures then run once), in collection order. The files that take long (seconds on the 2-core
# machine) go first: the longest first shortens the run. Others keep their order after these.
# (`--dist loadgroup` would allow finer units, but xdist 3.8 cannot mark pytest 9's test ids with their group.)
LONG = {
    "tests/conformance/test_conformance.py": 800,
    "tests/integration/test_ray_executor.py": 300,
    "tests/integration/test_ci_gate.py": 200,
    "tests/audit/test_step_audit.py": 120,
    "tests/conformance/test_jax_forms.py": 90,
    "tests/audit/test_bench_audit.py": 90,
    "tests/integration/test_bench_run.py": 90,
    "tests/e2e/test_report_browser.py": 90,
    "tests/reliability/test_faults.py": 80,
    "tests/integration/test_tf_privacy_run.py": 75,
    "tests/integration/test_federated_run.py": 60,
    "tests/conformance/test_federated_local.py": 40,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (its workers collect), the long files first; a stable sort keeps each file's order."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: -LONG.get(item.nodeid.split("::")[0], 0))
