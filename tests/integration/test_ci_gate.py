"""The CI gate inside `make test`: suites/ci.yaml from scratch against the committed baseline, and proof that it
fails when the baseline is stricter than what this code achieves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GATE = REPO / "scripts" / "ci-gate.sh"
BASELINE = REPO / "baselines" / "ci" / "results.parquet"


def gate(results: Path, *, baseline: str | Path = "ci", reuse: bool = False) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "BIN": str(REPO / ".venv" / "bin"),
        "CI_RESULTS": str(results),
        "CI_BASELINE": str(baseline),
        "CI_REUSE": "1" if reuse else "0",
        "CI_REPORT": str(results.parent / "ci.html"),
    }
    return subprocess.run(["bash", str(GATE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def shown(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    results = tmp_path_factory.mktemp("ci-gate") / "results"
    return results, gate(results)


def test_ci_suite_holds_against_the_committed_baseline(gate_run):
    results, proc = gate_run
    print(proc.stdout[-4000:])  # the comparison, for the CI log
    assert proc.returncode == 0, shown(proc)
    assert "PASS:" in proc.stdout and (results.parent / "ci.html").is_file()


def stricter(tmp: Path) -> Path:
    """The committed baseline, claiming 5 points more accuracy, 10x cheaper DP epochs and a smaller epsilon."""
    rows = pd.read_parquet(BASELINE)
    last = rows.groupby("run_id")["epoch"].transform("max") == rows["epoch"]
    rows.loc[last, "test_accuracy"] += 0.05
    dp = rows["dp"].astype(bool)
    rows.loc[dp, "epoch_seconds"] /= 10
    rows.loc[dp, "epsilon"] *= 0.99
    folder = tmp / "stricter"
    folder.mkdir()
    rows.to_parquet(folder / "results.parquet", index=False)
    return folder


def test_the_gate_fails_when_the_baseline_is_stricter_than_reality(gate_run, tmp_path):
    results, first = gate_run
    assert (results / "ci").is_dir(), shown(first)
    proc = gate(results, baseline=stricter(tmp_path), reuse=True)
    assert proc.returncode == 1, shown(proc)
    assert "FAIL:" in proc.stdout
    regressions = [line.split() for line in proc.stdout.splitlines() if line.startswith("REGRESSION")]
    for metric in ("accuracy", "epsilon", "dp_overhead"):
        assert any(metric in words for words in regressions), f"no {metric} regression\n" + shown(proc)
