"""The Backend protocol and the registry of backends, by lazy import string.

The orchestrator never imports a framework: the registry maps a name to
"module:Class" and only the worker, inside the backend's own environment, imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from bench.models import ModelSpec
from bench.spec import RunSpec


@dataclass(frozen=True)
class StepStats:
    """Mean loss and accuracy over the real (unmasked) examples of one step."""

    loss: float
    accuracy: float
    examples: int


class Backend(Protocol):
    name: ClassVar[str]
    variants: ClassVar[tuple[str, ...]]  # the first is the default

    def versions(self) -> dict[str, str]: ...

    def build(
        self, run: RunSpec, model: ModelSpec, init_params: dict[str, np.ndarray], *, physical_batch_size: int
    ) -> None:
        """Build `model` from the canonical weights; batches arrive padded to multiples of
        `physical_batch_size` rows."""
        ...

    def train_step(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        """One logical step on a padded batch; blocks until the device is done."""
        ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch of any size (the core computes loss and accuracy from them)."""
        ...

    def params(self) -> dict[str, np.ndarray]: ...

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        """Replace the model's weights (canonical layout); federated runs set the global model per client."""
        ...

    def local_train(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        """A federated client's local training from the current weights, without DP (the core clips and
        noises the model delta): x is (S, B, ...), y and mask (S, B); one step of the run's `train.optimizer`
        per leading index on the mean loss over the rows where mask is 1, from a fresh optimizer state; a step
        with no real rows changes nothing. Returns mean loss and accuracy over all real rows (each taken
        before its step's update); `params()` then gives the client's trained weights."""
        ...

    def reported_epsilon(self, delta: float) -> float | None: ...

    def peak_memory_mb(self) -> float | None:
        """Device memory peak where the framework knows it (GPU); None: the worker's RSS."""
        ...

    def compilations(self) -> int | None:
        """How many times the step has been compiled/traced so far (None if not tracked)."""
        ...


class Unsupported(Exception):
    """A backend/variant cannot run this workload (e.g. a model layer it has no per-example rule for).

    Raised from `build`; the run ends with status "unsupported" and this message, not as a failure.
    """


class Diverged(RuntimeError):
    """Training became non-finite: the run ends as "diverged", a result about the workload, not a crash."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:Class", imported only inside the backend's environment
    variants: tuple[str, ...]
    requirements: str  # path of its requirements.txt, relative to the project root

    @property
    def default_variant(self) -> str:
        return self.variants[0]


_REGISTRY: dict[str, BackendInfo] = {}


class UnknownBackendError(ValueError):
    pass


def register_backend(info: BackendInfo) -> None:
    _REGISTRY[info.name] = info


def get_backend_info(name: str) -> BackendInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackendError(f"unknown backend {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_backend(label: str) -> tuple[str, str]:
    """'opacus:ghost' -> ('opacus', 'ghost'); 'jax' -> ('jax', its default variant)."""
    name, _, variant = label.partition(":")
    info = get_backend_info(name.strip())
    variant = variant.strip() or info.default_variant
    if variant not in info.variants:
        raise UnknownBackendError(
            f"backend {info.name!r} has no variant {variant!r}; known: {', '.join(info.variants)}"
        )
    return info.name, variant


def create_backend(name: str) -> Backend:
    """Import and instantiate a backend: call only inside that backend's environment."""
    module, _, cls = get_backend_info(name).target.partition(":")
    return getattr(importlib.import_module(module), cls)()


register_backend(BackendInfo("jax", "backends.jax.backend:JaxBackend", ("bk", "vmap"), "backends/jax/requirements.txt"))
register_backend(
    BackendInfo(
        "opacus",
        "backends.opacus.backend:OpacusBackend",
        ("ghost", "hooks", "functorch"),
        "backends/opacus/requirements.txt",
    )
)
register_backend(
    BackendInfo(
        "tf_privacy",
        "backends.tf_privacy.backend:TFPrivacyBackend",
        ("vectorized", "keras", "fast", "vectorized-xla", "keras-xla", "fast-xla"),
        "backends/tf_privacy/requirements.txt",
    )
)
