"""Deliberately broken DP steps, for the audit's controls: they wrap the JAX backend and lie about what they do.

Used only by tests/audit through the step audit's `target` (a backend class to audit in the named backend's
environment); nothing registers them for a suite.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bench.backend import Backend, create_backend
from bench.models import ModelSpec
from bench.spec import RunSpec


class _Wrapped:
    """Every Backend method is the inner backend's; `build` sees a rewritten run."""

    def __init__(self) -> None:
        self._inner: Backend = create_backend("jax")

    def rewrite(self, run: RunSpec) -> RunSpec:
        raise NotImplementedError

    def build(self, run: RunSpec, model: ModelSpec, init: dict[str, np.ndarray], *, physical_batch_size: int) -> None:
        self._inner.build(self.rewrite(run), model, init, physical_batch_size=physical_batch_size)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class HalfNoise(_Wrapped):
    """Adds half the noise the run asks for."""

    def rewrite(self, run: RunSpec) -> RunSpec:
        return replace(run, dp=replace(run.dp, noise_multiplier=run.dp.noise_multiplier / 2))


class NoClip(_Wrapped):
    """Noise for the clip norm C, but large gradients are not clipped (C is 10^4 times larger, sigma as much smaller)."""

    def rewrite(self, run: RunSpec) -> RunSpec:
        dp = replace(run.dp, max_grad_norm=run.dp.max_grad_norm * 1e4, noise_multiplier=run.dp.noise_multiplier / 1e4)
        return replace(run, dp=dp)
