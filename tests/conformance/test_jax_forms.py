"""The JAX backend's fast forms against the plain ones, in the JAX environment (see jax_checks.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench.envs import PROJECT_ROOT
from tests.conformance.harness import python_for

CHECKS = [
    "conv_forms",
    "per_example",
    "clipped_sum",
    "split_sum",
    "slice_count",
    "xla_flags",
]  # jax_checks.CHECKS (jax is not importable here)


@pytest.mark.parametrize("check", CHECKS)
def test_jax_form(check: str) -> None:
    python = python_for("jax")
    if python is None:
        pytest.skip("the jax environment is not installed (make envs)")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [python, "-m", "tests.conformance.jax_checks", check],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:] or out.stdout[-3000:]
    assert f"{check}: ok" in out.stdout
