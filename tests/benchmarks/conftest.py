"""Micro-benchmarks (pytest-benchmark): `make bench` runs them, one JSON per environment in results/_benchmarks."""

from __future__ import annotations

import os

from bench.spec import DatasetSpec, DPConfig, RunSpec, TrainConfig
from bench.worker import THREAD_VARS, pin_threads

# The same thread pinning as `bench run` workers, set before any framework is imported.
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
for _var in THREAD_VARS:
    os.environ.setdefault(_var, str(THREADS))
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pin_threads(THREADS)


def run_spec(*, backend: str = "jax", variant: str = "vmap", model: str = "mlp", batch_size: int = 256,
             dataset_size: int = 60_000, augment: bool = False, dp: bool = True) -> RunSpec:  # fmt: skip
    """A Fashion-MNIST-sized run (or CIFAR-10-sized with `augment`) on synthetic data of the same shape."""
    shape = (32, 32, 3) if augment else (28, 28, 1)
    return RunSpec(
        suite="micro-benchmarks",
        workload=model,
        dataset=DatasetSpec(name="synthetic", shape=shape, num_classes=10, augment=augment),
        model=model,
        train=TrainConfig(epochs=1, batch_size=batch_size),
        dp=DPConfig(noise_multiplier=1.0) if dp else DPConfig(enabled=False),
        backend=backend,
        variant=variant,
        seed=0,
        dataset_size=dataset_size,
    )
