"""A small DP-FedAvg suite through `bench run`, on every installed backend in its own environment.

The core owns the partition, client sampling, batching, aggregation and server update, so the backends must agree
on everything but float rounding of the clients' local training: the same clients sampled per round, the same
adaptive clip norms, and accuracy within a small margin.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from bench.accounting import epsilon
from bench.backend import backend_names
from bench.envs import is_ready
from bench.results import read_results

pytestmark = pytest.mark.integration

BACKENDS = [b for b in backend_names() if is_ready(b)]
ROUNDS = 6

SUITE = f"""
name: tiny-fed
backends: [{", ".join(BACKENDS)}]
seeds: [0]
timeout: 600
workloads:
  - name: synthetic-fedavg
    dataset: {{name: synthetic, train_size: 1200, test_size: 400, shape: [8, 8, 1], num_classes: 4}}
    model: mlp
    train:
      epochs: 2
      batch_size: 16
      optimizer: {{name: sgd, learning_rate: 0.1}}
    federated:
      partition: {{kind: dirichlet, clients: 40, alpha: 1.0}}
      rounds: {ROUNDS}
      clients_per_round: 10
      eval_every: 3
    dp: {{max_grad_norm: 0.5, delta: 1.0e-5}}
    privacy:
      - dp: false
      - noise_multiplier: 0.0
      - noise_multiplier: 0.7
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    if not BACKENDS:
        pytest.skip("no backend environment is installed (make envs)")
    root = tmp_path_factory.mktemp("fed")
    (root / "tiny-fed.yaml").write_text(SUITE)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "tiny-fed.yaml", "--results", "results"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return read_results(root / "results").to_pandas(), proc.stdout


def test_every_run_is_ok_with_one_row_per_round(results):
    df, out = results
    assert f"{3 * len(BACKENDS)} runs: {3 * len(BACKENDS)} ok" in out
    assert set(df.status) == {"ok"} and set(df.workload_kind) == {"federated"}
    for _, run in df.groupby("run_id"):
        run = run.sort_values("epoch")
        assert list(run.epoch) == list(range(1, ROUNDS + 1))
        assert run.test_accuracy.notna().tolist() == [False, False, True, False, False, True]
        assert (run.total_clients == 40).all() and (run.clients_per_round == 10).all()
        assert run.test_accuracy.iloc[-1] > 0.4  # 4 classes: chance is 0.25


def test_user_level_epsilon_per_round(results):
    df, _ = results
    noisy = df[df.noise_multiplier == 0.7].sort_values("epoch")
    for _, run in noisy.groupby("run_id"):
        expected = epsilon(sample_rate=10 / 40, noise_multiplier=0.7, steps=ROUNDS, delta=1e-5)
        assert run.epsilon.iloc[-1] == pytest.approx(expected.pld, rel=0.02)
        assert run.epsilon_rdp.iloc[-1] == pytest.approx(expected.rdp, rel=1e-6)
        assert run.epsilon.is_monotonic_increasing
    assert df[df.noise_multiplier == 0.0].epsilon.map(math.isinf).all()
    assert df[~df.dp].epsilon.isna().all() and df[~df.dp].clip_norm.isna().all()


def test_backends_agree_on_what_the_core_decides(results):
    df, _ = results
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    for _, same in df.groupby(["dp", "noise_multiplier"], dropna=False):
        by_backend = {b: g.sort_values("epoch") for b, g in same.groupby("backend")}
        first = next(iter(by_backend.values()))
        for backend, run in by_backend.items():
            assert run.sampled_clients.tolist() == first.sampled_clients.tolist(), backend
            np.testing.assert_allclose(run.clip_norm.astype(float), first.clip_norm.astype(float), rtol=1e-5)
            final = run.test_accuracy.iloc[-1] - first.test_accuracy.iloc[-1]
            assert abs(final) <= 0.02, (backend, final)
