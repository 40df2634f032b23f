"""The core's own work per step (sampling, gathering, augmentation, padding): it must stay a small part of a step."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_spec

from bench.data.prepare import Dataset
from bench.data.sampling import augment, pad_batch, poisson_batch
from bench.worker import BatchSource


def _dataset(n: int, shape: tuple[int, int, int]) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return Dataset(x_train=x, y_train=y, x_test=x[:10], y_test=y[:10], num_classes=10)


@pytest.mark.parametrize("augmented", [False, True], ids=["fmnist-256", "cifar-256-augment"])
def test_batch_source_step(benchmark, augmented: bool) -> None:
    """Everything the core does for one step of a 60k/50k-example epoch at expected batch 256."""
    run = run_spec(augment=augmented, dataset_size=50_000 if augmented else 60_000)
    source = BatchSource(run, _dataset(run.dataset_size, (32, 32, 3) if augmented else (28, 28, 1)))
    steps = iter(range(10**9))
    x, y, mask = benchmark(lambda: source.batch(next(steps)))
    assert x.shape[0] == source.physical and mask.sum() > 0


def test_poisson_sampling(benchmark) -> None:
    steps = iter(range(10**9))
    idx = benchmark(lambda: poisson_batch(0, next(steps), 60_000, 256 / 60_000))
    assert 150 < len(idx) < 400


def test_augmentation(benchmark) -> None:
    x = np.random.default_rng(0).standard_normal((256, 32, 32, 3), dtype=np.float32)
    out = benchmark(augment, x, 0, 1)
    assert out.shape == x.shape


def test_padding(benchmark) -> None:
    x = np.random.default_rng(0).standard_normal((250, 28, 28, 1), dtype=np.float32)
    y = np.zeros(250, np.int32)
    xp, yp, mask = benchmark(pad_batch, x, y, 320)
    assert xp.shape[0] == 320 and mask.sum() == 250
