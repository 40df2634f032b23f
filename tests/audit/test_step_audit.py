"""Step audits of every installed backend's default variant on the MLP, and the controls that must fail.

Each backend steps in its own environment, as tests/conformance drives them. sigma = 0.25 (mu = 4) keeps mu-hat's
relative standard error near 3.5% at 600 trials, so [0.9, 1.1] is a 3-standard-error band.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.audit.auditor import StepAudit, plan_step_audits, run_step_audit, verdict_significance
from bench.backend import backend_names, get_backend_info
from bench.envs import env_python, is_ready
from bench.suite import load_suite

pytestmark = pytest.mark.integration

SIGMA = 0.25
TRIALS = 600
SIGNIFICANCE = verdict_significance(8)  # as a suite of eight audits would judge them
INSTALLED = [name for name in backend_names() if is_ready(name)]


def audits(tmp_path: Path, labels: list[str]) -> list[StepAudit]:
    suite = tmp_path / "step.yaml"
    suite.write_text(
        f"""
name: step-audit-test
backends: [{", ".join(labels)}]
workloads:
  - name: mlp
    dataset: {{name: synthetic, train_size: 1000, shape: [28, 28, 1], num_classes: 10}}
    model: mlp
    train: {{epochs: 1, batch_size: 64}}
    dp: {{max_grad_norm: 0.1}}
    privacy: [{{noise_multiplier: {SIGMA}}}]
"""
    )
    return plan_step_audits(load_suite(suite), TRIALS)


@pytest.mark.parametrize("backend", INSTALLED)
def test_default_variant_is_consistent_and_measures_mu(tmp_path, backend):
    (audit,) = audits(tmp_path, [backend])
    assert audit.run.variant == get_backend_info(backend).default_variant and audit.copies == 1
    row, control = run_step_audit(audit, str(env_python(backend)), tmp_path / "logs", SIGNIFICANCE)
    assert row["status"] == "ok", row["error"]
    mu_sigma = row["mu_hat"] * SIGMA
    assert row["verdict"] == "consistent", row
    assert 0.9 <= mu_sigma <= 1.1, row
    assert row["mu_low"] * SIGMA < 1 < row["mu_high"] * SIGMA
    assert 0 <= row["epsilon_lower"] <= row["epsilon_ceiling"]
    assert row["epsilon_lower"] < row["epsilon"]
    # The control: the same trials judged against sigma claimed 4x larger (a 4x weaker claim) must fail.
    assert control is not None and control["control"] and control["verdict"] == "violation", control
    assert control["claimed_noise_multiplier"] == pytest.approx(4 * SIGMA)


@pytest.mark.skipif("jax" not in INSTALLED, reason="the broken backends wrap the JAX backend")
@pytest.mark.parametrize("broken", ["HalfNoise", "NoClip"])
def test_a_broken_dp_step_is_caught(tmp_path, broken):
    (audit,) = audits(tmp_path, ["jax"])
    row, _ = run_step_audit(
        audit, str(env_python("jax")), tmp_path / "logs", SIGNIFICANCE, target=f"tests.audit.broken:{broken}"
    )
    assert row["status"] == "ok", row["error"]
    assert row["verdict"] == "violation", row
    assert row["mu_hat"] * SIGMA > 1.5


def test_a_failing_backend_is_recorded_as_failed_with_its_error(tmp_path):
    (audit,) = audits(tmp_path, ["jax"])
    row, control = run_step_audit(
        audit,
        str(env_python("jax")) if "jax" in INSTALLED else "python3",
        tmp_path / "l",
        SIGNIFICANCE,
        target="tests.audit.broken:NoSuchBackend",
    )
    assert row["status"] == "failed" and control is None
    assert "NoSuchBackend" in row["error"]
    assert row["verdict"] == ""
