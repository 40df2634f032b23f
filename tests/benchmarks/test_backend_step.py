"""One DP-SGD step of each backend/variant on fixed inputs (Fashion-MNIST MLP, expected batch 256).

Runs in a backend's own environment (`make bench` runs this file once per environment); the labels of
backends not installed here are skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_spec

from bench.backend import backend_names, create_backend, get_backend_info
from bench.data.sampling import pad_batch, physical_batch_size, poisson_batch
from bench.models import build_spec, init_params

LABELS = [f"{name}:{variant}" for name in backend_names() for variant in get_backend_info(name).variants]
CASES = [(label, True) for label in LABELS] + [(f"{name}:{get_backend_info(name).variants[0]}", False)
                                               for name in backend_names()]  # fmt: skip


def _built(label: str, dp: bool):
    name, variant = label.split(":")
    try:
        backend = create_backend(name)
    except ImportError as e:
        pytest.skip(f"{name} is not installed in this environment ({e})")
    run = run_spec(backend=name, variant=variant, dp=dp)
    spec = build_spec(run.model, (28, 28, 1), 10)
    physical = physical_batch_size(run.train.batch_size, run.sample_rate, poisson=True)
    backend.build(run, spec, init_params(spec, 0), physical_batch_size=physical)
    rng = np.random.default_rng(0)
    idx = poisson_batch(0, 0, run.dataset_size, run.sample_rate)
    x = rng.standard_normal((len(idx), 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, len(idx)).astype(np.int32)
    return backend, pad_batch(x, y, physical)


@pytest.mark.parametrize(("label", "dp"), CASES, ids=[f"{lab}-{'dp' if dp else 'nonprivate'}" for lab, dp in CASES])
def test_train_step(benchmark, label: str, dp: bool) -> None:
    backend, (x, y, mask) = _built(label, dp)
    backend.train_step(x, y, mask)  # compile / trace outside the measurement
    stats = benchmark.pedantic(backend.train_step, args=(x, y, mask), rounds=5, warmup_rounds=1)
    assert np.isfinite(stats.loss) and stats.examples == mask.sum()
