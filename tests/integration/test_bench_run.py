"""`bench run` end to end: a tiny suite through the CLI with JAX in its own environment."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.results import SCHEMA, SCHEMA_VERSION, read_results

pytestmark = pytest.mark.integration

BENCH = [sys.executable, "-m", "bench"]

SUITE = """
name: tiny
description: "integration test"
backends: [jax]
seeds: [0]
timeout: 300
workloads:
  - name: synthetic-mlp
    dataset: {name: synthetic, train_size: 1024, test_size: 512, shape: [8, 8, 1], num_classes: 4}
    model: mlp
    train:
      epochs: 3
      batch_size: 128
      optimizer: {name: sgd, learning_rate: 0.5, momentum: 0.5}
    dp: {max_grad_norm: 1.0, delta: 1.0e-5}
    privacy:
      - dp: false
      - noise_multiplier: 0.8
      - target_epsilon: 8.0
"""


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("run")
    (root / "tiny.yaml").write_text(SUITE)
    proc = bench("run", "tiny.yaml", "--results", "results", cwd=root)
    return root, proc


def test_run_succeeds_and_writes_one_file_per_run(finished):
    root, proc = finished
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 runs: 3 ok" in proc.stdout
    files = sorted((root / "results" / "tiny").glob("*.parquet"))
    assert len(files) == 3
    for f in files:
        table = pq.read_table(f)
        assert table.schema.equals(SCHEMA)
        assert table.num_rows == 3  # one row per epoch
    assert (root / "results" / "tiny" / "_logs").is_dir()


def test_rows_are_consistent(finished):
    root, _ = finished
    df = read_results(root / "results").to_pandas()
    assert set(df.status) == {"ok"}
    assert set(df.schema_version) == {SCHEMA_VERSION}
    assert set(df.backend) == {"jax"} and set(df.variant) == {"bk"}
    for _, run in df.groupby("run_id"):
        run = run.sort_values("epoch")
        assert list(run.epoch) == [1, 2, 3]
        assert run.test_accuracy.iloc[-1] > 0.5  # 4 classes: chance is 0.25
        assert (run.train_seconds > 0).all() and (run.examples_per_second > 0).all()
        assert run.compilations.max() == 1, "the step recompiled after the first step"
        assert run.compile_seconds.notna().all()
        if run.dp.iloc[0]:
            eps = list(run.epsilon)
            assert all(b >= a for a, b in zip(eps, eps[1:])), eps
            assert (run.epsilon <= run.epsilon_rdp + 1e-9).all()
        else:
            assert run.epsilon.isna().all()
    calibrated = df[df.target_epsilon.notna()]
    assert math.isclose(calibrated.epsilon.max(), 8.0, rel_tol=0.03)
    assert calibrated.epsilon.max() <= 8.0


def test_resume_skips_finished_runs(finished):
    root, _ = finished
    files = sorted((root / "results" / "tiny").glob("*.parquet"))
    before = {f: f.stat().st_mtime_ns for f in files}
    proc = bench("run", "tiny.yaml", "--results", "results", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skip") == 3
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_dry_run_lists_sigma_steps_and_epsilon(finished):
    root, _ = finished
    proc = bench("run", "tiny.yaml", "--results", "results", "--dry-run", cwd=root)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "synthetic-mlp" in line]
    assert len(lines) == 3 and all(line.rstrip().endswith("ok") for line in lines)
    assert "0.8" in proc.stdout and " 24 " in proc.stdout  # sigma, 3 epochs x 8 steps


def test_timeout_and_divergence_become_statuses(tmp_path):
    suite = SUITE.replace("learning_rate: 0.5", "learning_rate: 1.0e+30").replace("timeout: 300", "timeout: 120")
    (tmp_path / "bad.yaml").write_text(suite.replace("name: tiny", "name: bad"))
    proc = bench("run", "bad.yaml", "--results", "r", cwd=tmp_path)
    assert proc.returncode == 1
    df = read_results(tmp_path / "r").to_pandas()
    assert set(df.status) == {"diverged"}, df[["status", "error"]]
    assert df.error.str.contains("non-finite").all()

    proc = bench("run", "bad.yaml", "--results", "t", "--timeout", "0.5", cwd=tmp_path)
    assert proc.returncode == 1
    df = read_results(tmp_path / "t").to_pandas()
    assert set(df.status) == {"timeout"}
    assert df.error.str.contains("time limit").all()


def test_bad_suite_is_one_clear_error(tmp_path):
    (tmp_path / "bad.yaml").write_text(SUITE.replace("batch_size: 128", "batch_size: 5000"))
    proc = bench("run", "bad.yaml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "bad.yaml: workloads[0].train.batch_size: got 5000" in proc.stderr


def test_dry_run_probe_projects_wall_times_without_writing_results(tmp_path):
    (tmp_path / "tiny.yaml").write_text(SUITE)
    args = ("--results", "r", "--dry-run", "--probe", "--probe-steps", "2", "--timeout", "0.5")
    proc = bench("run", "tiny.yaml", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probing = [line for line in proc.stdout.splitlines() if line.startswith("probing ")]
    assert len(probing) == 2, proc.stdout  # non-private and DP; the two DP settings share one probe
    assert all(line.endswith(" s)") and " s/step " in line for line in probing), probing
    assert "projected" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if "synthetic-mlp " in line and not line.startswith("probing")]
    assert len(rows) == 3 and all(line.split()[-1] == "pending" for line in rows)
    assert all(line.split()[-2].endswith("s") for line in rows)  # e.g. 6.8s
    assert "3 runs would exceed the per-run timeout of 0.5s (they will end as timeout)" in proc.stdout
    assert list((tmp_path / "r").rglob("*.parquet")) == []
    assert len(list((tmp_path / "r" / "tiny" / "_logs").glob("probe-*.log"))) == 2


def test_memory_limit_of_the_suite_stops_workers_as_oom(tmp_path):
    suite = SUITE.replace("timeout: 300", "timeout: 300\nmemory_limit_gb: 0.1").replace("name: tiny", "name: hog")
    (tmp_path / "hog.yaml").write_text(suite)
    proc = bench("run", "hog.yaml", "--results", "r", cwd=tmp_path)  # a JAX worker needs ~200 MB
    assert proc.returncode == 1, proc.stdout + proc.stderr
    df = read_results(tmp_path / "r").to_pandas()
    assert set(df.status) == {"oom"}, df[["status", "error"]]
    assert df.error.str.contains("over the memory limit of 0.1 GiB").all()
    assert "3 runs: 3 oom" in proc.stdout
