"""`bench audit` end to end on a small suite with an `audit:` block: step audits, one-run audits, controls,
resume, exit codes, the records' schema and the report's "measured privacy" section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from bench.audit.records import AUDIT_SCHEMA, AUDIT_SCHEMA_VERSION, read_audits
from bench.envs import is_ready
from bench.report import make_report, render
from bench.resultset import load_results

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not is_ready("jax"), reason="needs the jax environment")]

SUITE = """
name: tiny-audit <b>&amp;
backends: [jax]
seeds: [0]
workloads:
  - name: digits-mlp
    dataset: {name: digits}
    model: mlp
    train:
      epochs: 8
      batch_size: 64
      optimizer: {name: sgd, learning_rate: 2.0, momentum: 0.9}
    dp: {max_grad_norm: 0.1, delta: 1.0e-5}
    audit: {canaries: 300, guesses: 60}
    privacy:
      - {dp: false, learning_rate: 0.1}
      - target_epsilon: 1.0
"""


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("bench-audit")
    suite = tmp / "tiny.yaml"
    suite.write_text(SUITE)
    results = tmp / "results"
    return suite, results, bench("audit", str(suite), "--trials", "400", "--results", str(results))


def test_audits_end_as_expected_and_exit_0(audited):
    _, results, proc = audited
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every audit consistent, every control a violation" in proc.stdout
    audits = read_audits(results)
    assert len(audits) == 4  # a step audit and its control, a DP one-run audit and the non-private control
    by = {(k, bool(c)): r for (k, c), r in audits.groupby(["audit_kind", "control"])}
    step, one_run = by[("step", False)].iloc[0], by[("one-run", False)].iloc[0]
    assert step["verdict"] == "consistent" and by[("step", True)].iloc[0]["verdict"] == "violation"
    assert step["trials"] == 400 and 0.7 < step["mu_hat"] * step["noise_multiplier"] < 1.3
    assert one_run["verdict"] == "consistent" and one_run["canaries"] == 300 and one_run["guesses"] == 60
    control = by[("one-run", True)].iloc[0]
    assert control["verdict"] == "violation" and not control["dp"]
    # The non-private control's bound clears the DP run's, and its claim is that run's epsilon.
    assert control["epsilon_lower"] > one_run["epsilon_lower"] + 1
    assert control["epsilon"] == pytest.approx(one_run["epsilon"])
    assert (audits["epsilon_lower"] <= audits["epsilon_ceiling"] + 1e-12).all()


def test_records_are_versioned_parquet_beside_the_runs_and_runs_carry_canary_scores(audited):
    _, results, _ = audited
    files = sorted(results.rglob("_audit/*.parquet"))
    assert len(files) == 4
    table = pq.read_table(files[0])
    assert table.schema.equals(AUDIT_SCHEMA) and table.column("schema_version")[0].as_py() == AUDIT_SCHEMA_VERSION
    runs = load_results(results).frame  # audit records are not runs: the run reader skips `_audit`
    assert set(runs["workload"]) == {"digits-mlp"} and runs["run_id"].nunique() == 2
    last = runs[runs["epoch"] == runs["epoch"].max()]
    assert all(len(s) == 300 for s in last["canary_scores"]) and all(len(i) == 300 for i in last["canary_included"])
    assert (runs["dataset_size"] == runs["dataset_size"].iloc[0]).all()  # both runs train on the same enlarged set


def test_a_second_audit_resumes_without_running_anything(audited):
    suite, results, _ = audited
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*.parquet")}
    proc = bench("audit", str(suite), "--trials", "400", "--results", str(results))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already audited" in proc.stdout and "skip" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*.parquet")}
    runs_before = {p: t for p, t in before.items() if "_audit" not in p.parts}
    assert {p: after[p] for p in runs_before} == runs_before  # no training run again


def test_bad_input_exits_2(tmp_path, audited):
    suite, _, _ = audited
    assert bench("audit", str(suite), "--trials", "3").returncode == 2
    assert bench("audit", str(tmp_path / "missing.yaml")).returncode == 2
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text(
        SUITE.replace("      - target_epsilon: 1.0\n", "").replace("    audit: {canaries: 300, guesses: 60}\n", "")
    )
    proc = bench("audit", str(nothing), "--results", str(tmp_path / "r"))
    assert proc.returncode == 2 and "nothing to audit" in proc.stdout + proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.replace("guesses: 60", "guesses: 600"))
    proc = bench("audit", str(bad))
    assert proc.returncode == 2 and "audit.guesses" in proc.stderr and str(bad) in proc.stderr


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_shows_measured_privacy_escaped(audited, fmt):
    _, results, _ = audited
    text = render(make_report(results), fmt)
    assert "Measured privacy" in text
    assert "violation" in text and "consistent" in text and "60/60" in text
    assert "<b>&amp;" not in text  # the suite's name is text, never markup
    if fmt == "md":
        rows = [line for line in text.splitlines() if line.startswith("| jax:bk |") and "control" in line]
        assert len(rows) == 2
    else:
        assert '<table class="audits">' in text


def test_exit_1_when_a_control_is_not_a_violation(tmp_path):
    """A DP run far weaker than epsilon 1 makes the non-private control's claim unreachable: the control holds,
    which is a failed control, and bench audit says so with exit 1."""
    suite = tmp_path / "weak.yaml"
    suite.write_text(SUITE.replace("target_epsilon: 1.0", "target_epsilon: 50.0"))
    proc = bench("audit", str(suite), "--no-step", "--results", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not as expected" in proc.stdout and "control one-run" in proc.stdout
    assert isinstance(read_audits(tmp_path / "r"), pd.DataFrame)
