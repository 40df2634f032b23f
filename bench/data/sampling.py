"""Batch samplers and physical padding: pure functions of (seed, step), numpy only.

Poisson sampling is what DP-SGD's accountants assume (Abadi et al. 2016; Mironov et al.
2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism"): at step t every
example joins the batch independently with probability q. `shuffle` batches a per-epoch
permutation; it is offered for comparison, but the Poisson accountant does not cover it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_AUGMENT_STREAM = 1
_SHUFFLE_STREAM = 2


def poisson_batch(seed: int, step: int, n: int, q: float) -> np.ndarray:
    """Indices of the examples in step `step`'s batch, each included with probability q."""
    rng = np.random.default_rng([seed, step])
    return np.flatnonzero(rng.random(n) < q)


@lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, _SHUFFLE_STREAM]).permutation(n)


def shuffle_batch(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The step's slice of a per-epoch permutation; the epoch's last batch may be smaller."""
    per_epoch = math.ceil(n / batch_size)
    epoch, j = divmod(step, per_epoch)
    return _permutation(seed, epoch, n)[j * batch_size : (j + 1) * batch_size].copy()


def physical_batch_size(batch_size: int, q: float, poisson: bool) -> int:
    """A fixed shape that holds a Poisson batch with overwhelming probability.

    Expected size + 4 standard deviations, rounded up to a multiple of 8; a rarer,
    larger batch is padded to a multiple of this size.
    """
    if not poisson:
        return batch_size
    sd = math.sqrt(batch_size * (1 - q))
    return max(8, math.ceil((batch_size + 4 * sd) / 8) * 8)


def pad_batch(x: np.ndarray, y: np.ndarray, physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad to the smallest multiple of `physical` rows (at least one); mask is 1 on real rows."""
    n = x.shape[0]
    rows = max(1, math.ceil(n / physical)) * physical
    xp = np.zeros((rows, *x.shape[1:]), dtype=x.dtype)
    xp[:n] = x
    yp = np.zeros((rows,), dtype=y.dtype)
    yp[:n] = y
    mask = np.zeros((rows,), dtype=np.float32)
    mask[:n] = 1.0
    return xp, yp, mask


def augment(x: np.ndarray, seed: int, step: int, *, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Random crop after zero padding (zero = the mean, on normalised data) and horizontal flip."""
    rng = np.random.default_rng([seed, step, _AUGMENT_STREAM])
    b, h, w, _ = x.shape
    if b == 0:
        return x
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = rng.integers(0, 2 * pad + 1, size=b)
    ox = rng.integers(0, 2 * pad + 1, size=b)
    rows = (oy[:, None] + np.arange(h))[:, :, None]
    cols = (ox[:, None] + np.arange(w))[:, None, :]
    out = padded[np.arange(b)[:, None, None], rows, cols]
    if flip:
        flips = rng.random(b) < 0.5
        out[flips] = out[flips, :, ::-1]
    return out
