"""bench.data.sampling: Poisson and shuffle samplers, physical padding, augmentation.

Statistical checks use fixed seeds (so they are deterministic) and tolerances of about 5 standard
errors (6 where the maximum over many indices is taken), so a correct sampler passes with room to
spare and a biased one (wrong q, wrong variance, favoured indices) fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bench.data.sampling import augment, pad_batch, physical_batch_size, poisson_batch, shuffle_batch

# --------------------------------------------------------------------------- Poisson


def test_poisson_batch_is_deterministic_per_seed_and_step():
    a = poisson_batch(3, 17, 10_000, 0.02)
    b = poisson_batch(3, 17, 10_000, 0.02)
    np.testing.assert_array_equal(a, b)


def test_poisson_batches_differ_across_steps_and_seeds():
    base = poisson_batch(0, 0, 10_000, 0.05)
    assert not np.array_equal(base, poisson_batch(0, 1, 10_000, 0.05))
    assert not np.array_equal(base, poisson_batch(1, 0, 10_000, 0.05))
    # (seed, step) is not collapsed into one number: (0, 1) and (1, 0) are different streams.
    assert not np.array_equal(poisson_batch(0, 1, 10_000, 0.05), poisson_batch(1, 0, 10_000, 0.05))


def test_poisson_batch_returns_sorted_unique_valid_indices():
    idx = poisson_batch(0, 5, 1_000, 0.3)
    assert idx.ndim == 1 and np.issubdtype(idx.dtype, np.integer)
    assert np.all(np.diff(idx) > 0)
    assert idx.min() >= 0 and idx.max() < 1_000


def test_poisson_batch_edge_rates():
    assert poisson_batch(0, 0, 100, 0.0).size == 0
    np.testing.assert_array_equal(poisson_batch(0, 0, 100, 1.0), np.arange(100))
    assert poisson_batch(0, 0, 0, 0.5).size == 0


N, Q, STEPS = 2_000, 0.05, 2_000


@pytest.fixture(scope="module")
def poisson_draws() -> list[np.ndarray]:
    return [poisson_batch(11, t, N, Q) for t in range(STEPS)]


def test_poisson_batch_size_mean_and_variance(poisson_draws):
    sizes = np.array([b.size for b in poisson_draws], dtype=float)
    mean, var = N * Q, N * Q * (1 - Q)  # Binomial(N, q)
    se_mean = math.sqrt(var / STEPS)
    assert abs(sizes.mean() - mean) < 5 * se_mean, (sizes.mean(), mean)
    # The sample variance of a binomial with N q large is close to normal: sd(s^2) ~ var * sqrt(2 / (S - 1)).
    se_var = var * math.sqrt(2 / (STEPS - 1))
    assert abs(sizes.var(ddof=1) - var) < 5 * se_var, (sizes.var(ddof=1), var)


def test_poisson_inclusion_frequency_per_index(poisson_draws):
    counts = np.bincount(np.concatenate(poisson_draws), minlength=N)
    freq = counts / STEPS
    se = math.sqrt(Q * (1 - Q) / STEPS)
    # Every index (max over 2000 of them: 6 standard errors, P(fail) ~ 2000 * 2e-9).
    assert np.max(np.abs(freq - Q)) < 6 * se
    # No systematic favouring of low or high indices.
    half = N // 2
    se_half = math.sqrt(Q * (1 - Q) / (STEPS * half))
    assert abs(freq[:half].mean() - Q) < 5 * se_half
    assert abs(freq[half:].mean() - Q) < 5 * se_half
    # Independence across steps: counts spread like Binomial(STEPS, q), not more or less.
    expected_var = STEPS * Q * (1 - Q)
    assert abs(counts.var(ddof=1) / expected_var - 1) < 5 * math.sqrt(2 / (N - 1))


# --------------------------------------------------------------------------- shuffle


@pytest.mark.parametrize("n, b", [(100, 10), (103, 10), (7, 7), (50, 64)])
def test_shuffle_epoch_is_a_permutation(n, b):
    per_epoch = math.ceil(n / b)
    for epoch in range(3):
        batches = [shuffle_batch(5, epoch * per_epoch + j, n, b) for j in range(per_epoch)]
        assert all(batch.size == b for batch in batches[:-1])
        assert batches[-1].size == n - b * (per_epoch - 1)
        union = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(union), np.arange(n))  # each index exactly once


def test_shuffle_epochs_and_seeds_differ():
    n, b = 1_000, 100
    epoch0 = np.concatenate([shuffle_batch(0, j, n, b) for j in range(10)])
    epoch1 = np.concatenate([shuffle_batch(0, 10 + j, n, b) for j in range(10)])
    other_seed = np.concatenate([shuffle_batch(1, j, n, b) for j in range(10)])
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, other_seed)
    assert not np.array_equal(epoch0, np.arange(n))  # actually shuffled


def test_shuffle_batch_is_deterministic_across_cache_evictions():
    first = shuffle_batch(9, 3, 500, 50).copy()
    for epoch in range(5):  # touch other permutations in between
        shuffle_batch(1, epoch * 10, 500, 50)
        shuffle_batch(2, epoch * 10, 400, 50)
    np.testing.assert_array_equal(shuffle_batch(9, 3, 500, 50), first)


def test_shuffle_batch_is_not_corrupted_by_callers_mutating_it():
    expected = [shuffle_batch(4, j, 100, 10).copy() for j in range(10)]
    batch = shuffle_batch(4, 0, 100, 10)
    batch.sort()
    batch[:] = 0
    for j in range(10):
        np.testing.assert_array_equal(shuffle_batch(4, j, 100, 10), expected[j])


# --------------------------------------------------------------------------- physical batch size


def test_physical_batch_size_without_poisson_is_the_batch_size():
    assert physical_batch_size(256, 256 / 60_000, False) == 256
    assert physical_batch_size(13, 0.5, False) == 13


@pytest.mark.parametrize("n, b", [(60_000, 256), (60_000, 2_048), (50_000, 128), (1_000, 100), (10_000, 1), (100, 100)])
def test_physical_batch_size_for_poisson(n, b):
    q = b / n
    p = physical_batch_size(b, q, True)
    sd = math.sqrt(n * q * (1 - q))
    assert p % 8 == 0 and p >= 8
    assert p >= b + 4 * sd  # expected size + 4 standard deviations...
    assert p < max(8, b + 4 * sd + 8)  # ...rounded up to the next multiple of 8, no further
    assert stats.binom.sf(p, n, q) < 1e-4  # a batch rarely needs a second chunk


# --------------------------------------------------------------------------- padding


def test_pad_batch_shapes_mask_and_contents():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(13, 4, 4, 2)).astype(np.float32)
    y = rng.integers(0, 10, size=13).astype(np.int32)
    xp, yp, mask = pad_batch(x, y, 8)
    assert xp.shape == (16, 4, 4, 2) and yp.shape == (16,) and mask.shape == (16,)
    assert xp.dtype == x.dtype and yp.dtype == y.dtype
    np.testing.assert_array_equal(xp[:13], x)
    np.testing.assert_array_equal(yp[:13], y)
    assert not xp[13:].any() and not yp[13:].any()
    np.testing.assert_array_equal(mask, np.r_[np.ones(13), np.zeros(3)])


@pytest.mark.parametrize(
    "n, physical, rows", [(8, 8, 8), (1, 8, 8), (9, 8, 16), (24, 8, 24), (25, 8, 32), (100, 32, 128)]
)
def test_pad_batch_rows_are_the_smallest_multiple_of_physical(n, physical, rows):
    xp, yp, mask = pad_batch(np.ones((n, 3), np.float32), np.ones(n, np.int64), physical)
    assert xp.shape[0] == yp.shape[0] == mask.shape[0] == rows
    assert mask.sum() == n


def test_pad_empty_batch_is_one_padded_chunk():
    xp, yp, mask = pad_batch(np.zeros((0, 28, 28, 1), np.float32), np.zeros((0,), np.int64), 16)
    assert xp.shape == (16, 28, 28, 1) and yp.shape == (16,)
    assert mask.shape == (16,) and mask.sum() == 0


# --------------------------------------------------------------------------- augmentation


def images(b: int = 32, h: int = 8, w: int = 8, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32)


def test_augment_is_deterministic_per_seed_and_step():
    x = images()
    np.testing.assert_array_equal(augment(x, 1, 2), augment(x, 1, 2))
    assert not np.array_equal(augment(x, 1, 2), augment(x, 1, 3))
    assert not np.array_equal(augment(x, 1, 2), augment(x, 2, 2))


def test_augment_keeps_shape_dtype_and_input():
    x = images()
    before = x.copy()
    out = augment(x, 0, 0)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(x, before)


def test_augment_without_pad_and_flip_is_identity():
    x = images()
    np.testing.assert_array_equal(augment(x, 0, 0, pad=0, flip=False), x)


def test_augment_flip_mirrors_width():
    x = images(b=64)
    out = augment(x, 3, 7, pad=0, flip=True)
    mirrored = x[:, :, ::-1, :]
    same = np.all(out == x, axis=(1, 2, 3))
    flipped = np.all(out == mirrored, axis=(1, 2, 3))
    assert np.all(same | flipped)  # every image is either untouched or mirrored left-right
    assert same.any() and flipped.any()


def test_augment_flip_rate_is_one_half():
    x = images(b=4_000, h=2, w=3, c=1)
    out = augment(x, 0, 0, pad=0, flip=True)
    rate = np.mean(np.all(out == x[:, :, ::-1, :], axis=(1, 2, 3)))
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / 4_000)


def test_augment_random_crop_is_a_crop_of_the_zero_padded_image():
    pad = 2
    x = images(b=200, h=6, w=5, c=2) + 10.0  # nonzero everywhere, so padding zeros are visible
    out = augment(x, 0, 0, pad=pad, flip=False)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = set()
    for i in range(len(x)):
        matches = [
            (oy, ox)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            if np.array_equal(out[i], padded[i, oy : oy + 6, ox : ox + 5])
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        offsets.update(matches)
    assert len(offsets) == (2 * pad + 1) ** 2  # every offset occurs (200 draws over 25 offsets)


def test_augment_empty_batch():
    x = np.zeros((0, 8, 8, 3), np.float32)
    assert augment(x, 0, 0).shape == (0, 8, 8, 3)
