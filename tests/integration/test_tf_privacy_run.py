"""`bench run` with TF Privacy in its own environment: its variants, its epsilon, its failure modes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.envs import is_ready
from bench.results import read_results

pytestmark = pytest.mark.integration

if not is_ready("tf_privacy"):
    pytest.skip("the tf_privacy environment is not installed (make setup)", allow_module_level=True)

SUITE = """
name: tiny-tf
description: "integration test"
backends: ["tf_privacy:vectorized", "tf_privacy:keras", "tf_privacy:fast", "jax"]
seeds: [0]
timeout: 300
workloads:
  - name: synthetic-mlp
    dataset: {name: synthetic, train_size: 512, test_size: 256, shape: [8, 8, 1], num_classes: 4}
    model: mlp
    train:
      epochs: 2
      batch_size: 64
      optimizer: {name: sgd, learning_rate: 0.5, momentum: 0.5}
    dp: {max_grad_norm: 1.0, delta: 1.0e-5}
    privacy:
      - noise_multiplier: 0.8
  - name: synthetic-cnn
    dataset: {name: synthetic, train_size: 128, test_size: 64, shape: [28, 28, 1], num_classes: 10}
    model: cnn-mnist
    train: {epochs: 1, batch_size: 32}
    dp: {max_grad_norm: 1.0, delta: 1.0e-5}
    privacy:
      - noise_multiplier: 1.0
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tf")
    (root / "tiny.yaml").write_text(SUITE)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "tiny.yaml", "--results", "results"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    df = read_results(root / "results").to_pandas()
    return proc, df.sort_values(["workload", "backend", "variant", "epoch"])


def _final(df, workload: str, label: str):
    backend, variant = label.split(":")
    rows = df[(df.workload == workload) & (df.backend == backend) & (df.variant == variant)]
    assert len(rows), f"no rows for {workload} {label}"
    return rows.iloc[-1]


@pytest.mark.parametrize("variant", ["vectorized", "keras", "fast"])
def test_mlp_runs_ok_with_tf_privacys_own_epsilon(results, variant):
    _, df = results
    row = _final(df, "synthetic-mlp", f"tf_privacy:{variant}")
    assert row.status == "ok", row.error
    assert row.test_accuracy > 0.4  # 4 classes: chance is 0.25
    # compute_dp_sgd_privacy is RDP over a coarser grid of orders than the core's RDP
    # accountant: the same bound, a little looser (1.225 vs 1.218 on the quickstart)
    assert row.epsilon_rdp * (1 - 1e-6) <= row.epsilon_reported <= row.epsilon_rdp * 1.05
    assert row.compilations == 1


def test_fast_clipping_on_a_cnn_is_unsupported_not_failed(results):
    proc, df = results
    row = _final(df, "synthetic-cnn", "tf_privacy:fast")
    assert row.status == "unsupported"
    assert "Conv2D" in row.error
    assert "unsupported" in proc.stdout


def test_vectorized_runs_the_cnn(results):
    _, df = results
    assert _final(df, "synthetic-cnn", "tf_privacy:vectorized").status == "ok"


def test_tf_accuracy_matches_jax_on_the_same_workload(results):
    """Same weights, batches, clipping and divisor: only the noise draws differ."""
    _, df = results
    tf = _final(df, "synthetic-mlp", "tf_privacy:vectorized").test_accuracy
    jax = _final(df, "synthetic-mlp", "jax:bk").test_accuracy
    assert abs(tf - jax) < 0.15


OOM_SUITE = """
name: oom-tf
description: "integration test"
backends: ["tf_privacy:vectorized-xla"]
seeds: [0]
timeout: 600
workloads:
  - name: synthetic-cnn
    dataset: {name: synthetic, train_size: 4096, test_size: 64, shape: [28, 28, 1], num_classes: 10}
    model: cnn-tanh
    train: {epochs: 1, batch_size: 512}
    dp: {max_grad_norm: 1.0, delta: 1.0e-5}
    privacy:
      - noise_multiplier: 1.0
"""


def test_oversized_xla_step_ends_as_oom(tmp_path: Path):
    """The vectorized optimizer under XLA asks for ~32 GiB at batch 512: an `oom` result, not a crash.

    With --memory-limit 4 the run ends as oom whether XLA's allocation fails (a machine with
    less memory than it asks for) or succeeds and the watchdog stops the worker.
    """
    (tmp_path / "oom.yaml").write_text(OOM_SUITE)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "oom.yaml", "--results", "results", "--memory-limit", "4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    df = read_results(tmp_path / "results").to_pandas()
    assert proc.returncode == 1
    assert list(df.status.unique()) == ["oom"], df.error.iloc[0]
    assert "memory" in df.error.iloc[0].lower()
