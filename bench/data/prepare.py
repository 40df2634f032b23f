"""Turn a DatasetSpec into normalised NHWC float32 arrays, cached once for every backend.

Normalisation uses fixed, public per-dataset constants, never statistics of the private
training set (those would themselves leak information about it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.data.loaders import RawDataset, load_raw, make_synthetic
from bench.spec import DatasetSpec

# (mean, std) per channel on the [0, 1] scale.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3,), (0.4,)),
}
PIXEL_SCALE = {"digits": 16.0}
_SUBSET_SEED = 0x5B5E7


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _raw(spec: DatasetSpec) -> RawDataset:
    if spec.name == "synthetic":
        return make_synthetic(
            n_train=spec.train_size or 10_000,
            n_test=spec.test_size or 2_000,
            shape=spec.shape or (28, 28, 1),
            num_classes=spec.num_classes or 10,
            seed=0,
        )
    return load_raw(spec.name)


def _subset(x: np.ndarray, y: np.ndarray, size: int | None, stream: int) -> tuple[np.ndarray, np.ndarray]:
    if size is None or size >= len(y):
        return x, y
    idx = np.sort(np.random.default_rng([_SUBSET_SEED, stream]).permutation(len(y))[:size])
    return x[idx], y[idx]


def _normalise(name: str, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if name not in NORMALISATION:
        return x
    mean, std = NORMALISATION[name]
    x /= PIXEL_SCALE.get(name, 255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def prepare(spec: DatasetSpec) -> Dataset:
    """Load, take the (fixed, seeded) subset and normalise."""
    raw = _raw(spec)
    x_train, y_train = _subset(raw.x_train, raw.y_train, spec.train_size, 0)
    x_test, y_test = _subset(raw.x_test, raw.y_test, spec.test_size, 1)
    return Dataset(
        _normalise(spec.name, x_train),
        y_train.astype(np.int64),
        _normalise(spec.name, x_test),
        y_test.astype(np.int64),
        raw.num_classes,
    )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dpbench" / "prepared"


def dataset_key(spec: DatasetSpec) -> str:
    content = {k: v for k, v in asdict(spec).items() if k != "augment"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def prepared_path(spec: DatasetSpec, root: Path | None = None) -> Path:
    """Prepare once and store as .npz; later calls (and every worker) reuse the file."""
    path = (root or cache_dir()) / f"{spec.name}-{dataset_key(spec)}.npz"
    if not path.exists():
        data = prepare(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            x_train=data.x_train,
            y_train=data.y_train,
            x_test=data.x_test,
            y_test=data.y_test,
            num_classes=np.int64(data.num_classes),
        )
        os.replace(tmp, path)
    return path


def load_prepared(path: str | Path) -> Dataset:
    with np.load(path) as f:
        return Dataset(f["x_train"], f["y_train"], f["x_test"], f["y_test"], int(f["num_classes"]))
