"""The canaries of a one-run audit (Steinke, Nasr & Jagielski 2023): built by the core, numpy only.

Every backend trains on the same enlarged training set: the workload's data (less the examples that became
canaries) plus the canaries whose inclusion bit is set. The canaries and their bits follow from the run's seed
alone, through generators whose entropy no other stream of the core uses (a third element, so `[seed, a, b]`
can never equal the two-element `[seed, step]` of Poisson sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.data.prepare import Dataset
from bench.spec import AuditConfig

_CANARY_STREAM = (0xCA1A, 1)
_INCLUSION_STREAM = (0xCA1A, 2)


def inclusion(seed: int, canaries: int) -> np.ndarray:
    """Which canaries are trained on: independent fair coins from the run's seed."""
    return np.random.default_rng([seed, *_INCLUSION_STREAM]).random(canaries) < 0.5


def training_size(n: int, audit: AuditConfig, seed: int) -> int:
    """The enlarged training set's size N (what the sample rate and the accountant use)."""
    base = n - audit.canaries if audit.kind == "mislabeled" else n
    return base + int(inclusion(seed, audit.canaries).sum())


@dataclass(frozen=True)
class Canaries:
    x: np.ndarray
    y: np.ndarray
    included: np.ndarray


def with_canaries(data: Dataset, audit: AuditConfig, seed: int) -> tuple[Dataset, Canaries]:
    """The enlarged training set and the canaries (all of them, with their inclusion bits).

    `mislabeled`: training examples relabelled with another class chosen at random, and taken out of the
    training set (an "out" canary is absent, not merely correctly labelled). `noise`: inputs drawn from N(0, 1)
    (the scale of the normalised data) with random labels.
    """
    n, classes = len(data.y_train), data.num_classes
    if audit.kind == "mislabeled" and audit.canaries >= n:
        raise ValueError(f"audit.canaries: {audit.canaries} mislabeled canaries need more than {n} training examples")
    rng = np.random.default_rng([seed, *_CANARY_STREAM])
    keep = np.ones(n, bool)
    if audit.kind == "mislabeled":
        idx = np.sort(rng.choice(n, size=audit.canaries, replace=False))
        x = data.x_train[idx]
        y = (data.y_train[idx] + rng.integers(1, classes, size=audit.canaries)) % classes
        keep[idx] = False
    else:
        x = rng.normal(size=(audit.canaries, *data.x_train.shape[1:])).astype(data.x_train.dtype)
        y = rng.integers(0, classes, size=audit.canaries)
    y = y.astype(data.y_train.dtype)
    included = inclusion(seed, audit.canaries)
    enlarged = Dataset(
        np.concatenate([data.x_train[keep], x[included]]),
        np.concatenate([data.y_train[keep], y[included]]),
        data.x_test,
        data.y_test,
        data.num_classes,
    )
    return enlarged, Canaries(x=x, y=y, included=included)


def scores(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each canary's log-likelihood of its (canary) label under the final model: higher means "trained on"."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z[np.arange(len(y)), y] - np.log(np.exp(z).sum(-1))
