"""The audit statistics against published reference values and at their extremes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from bench.audit import stats


def deterministic_normal(shift: float, n: int) -> np.ndarray:
    """n scores at the midpoints of N(shift, 1)'s quantiles: a draw without randomness."""
    return scipy.stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + shift


@pytest.mark.parametrize(("shift", "expected"), [(0, 0.0), (1, 1.13346), (2, 2.311945), (4, 4.395568)])
def test_one_run_bound_reproduces_jax_privacys_reference_values(shift, expected):
    """jax_privacy's tests/auditing_test.py: 10,000 in and 10,000 out scores, significance 0.05, delta 1e-6,
    one-sided guesses at the best threshold (Bonferroni over the thresholds)."""
    eps = stats.epsilon_one_run_all_thresholds(
        deterministic_normal(shift, 10_000), deterministic_normal(0, 10_000), delta=1e-6, significance=0.05
    )
    assert eps == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_all_guesses_right_is_the_ceiling_and_half_right_is_nothing():
    assert stats.one_run_ceiling(1000, 100, 1e-5) == pytest.approx(3.47, abs=0.005)  # the figure
    assert stats.epsilon_one_run(1000, 100, 100, 1e-5) == stats.one_run_ceiling(1000, 100, 1e-5)
    assert stats.epsilon_one_run(1000, 100, 50, 1e-5) == 0.0
    assert stats.epsilon_one_run(1000, 100, 60, 1e-5) < 0.1
    more = [stats.epsilon_one_run(1000, 100, v, 1e-5) for v in (70, 80, 90, 100)]
    assert more == sorted(more) and more[0] > 0


def test_p_value_is_a_binomial_tail_without_delta_and_grows_with_epsilon():
    assert stats.one_run_p_value(10, 10, 10, 0.0, 0.0) == pytest.approx(0.5**10)
    p = [stats.one_run_p_value(1000, 100, 80, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert p == sorted(p)
    with pytest.raises(ValueError, match="correct"):
        stats.one_run_p_value(10, 5, 6, 1.0, 0.0)


def test_guesses_take_the_top_and_bottom_scores_and_never_look_at_inclusion():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, True, False, True, False, False])
    g = stats.top_bottom_guesses(scores, included, 2, 2)
    assert (g.guesses, g.correct) == (4, 4)
    flipped = stats.top_bottom_guesses(scores, ~included, 2, 2)
    assert (flipped.guesses, flipped.correct) == (4, 0)
    with pytest.raises(ValueError):
        stats.top_bottom_guesses(scores, included, 4, 3)


def test_gaussian_epsilon_is_the_claim_of_one_gaussian_step():
    assert stats.gaussian_epsilon(1.0, 1e-5) == pytest.approx(4.38, abs=0.005)  # sigma = 1
    assert stats.gaussian_epsilon(0.0, 1e-5) == 0.0
    assert stats.gaussian_epsilon(math.inf, 1e-5) == math.inf
    assert stats.gaussian_epsilon(0.25, 1e-5) < stats.gaussian_epsilon(1.0, 1e-5)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_mu_fit_recovers_a_gaussian_shift_with_a_covering_interval(mu):
    rng = np.random.default_rng(7)
    fit = stats.fit_mu(rng.normal(mu, 1.0, 20_000), rng.normal(0.0, 1.0, 20_000), 1e-4)
    assert fit.low < mu < fit.high
    assert fit.lower_bound < fit.low < fit.mu < fit.high
    assert abs(fit.mu - mu) < 0.05


def test_split_bound_is_below_the_truth_and_the_ceiling():
    rng = np.random.default_rng(3)
    s_in, s_out = rng.normal(1.0, 1, 2000), rng.normal(0.0, 1, 2000)
    bound = stats.epsilon_split(s_in, s_out, 1e-5)
    assert 0 < bound.epsilon < stats.gaussian_epsilon(1.0, 1e-5)
    assert bound.epsilon <= bound.ceiling
    same = stats.epsilon_split(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), 1e-5)
    assert same.epsilon < 0.3
