"""Federated accounting: epsilon per round by incremental composition, and user-level client calibration.

The calibration case is the TensorFlow Federated DP tutorial ("Differential Privacy in TFF"):
3,383 EMNIST clients, 100 rounds, base noise 0.5 at 50 clients, target (2, 1e-5).
"""

from __future__ import annotations

import functools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from bench.accounting import (
    CalibrationError,
    ClientCalibration,
    Epsilons,
    calibrate_clients,
    epsilon,
    epsilon_curve,
)

DELTA = 1e-5
TOTAL, ROUNDS, PER_CLIENT, TARGET = 3383, 100, 0.5 / 50, 2.0
# The orders of the tutorial's TF Privacy `compute_rdp` call.
TUTORIAL_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

calibrated = functools.lru_cache(maxsize=None)(calibrate_clients)


def tutorial(accountant: str) -> ClientCalibration:
    return calibrated(
        target_epsilon=TARGET,
        delta=DELTA,
        rounds=ROUNDS,
        total_clients=TOTAL,
        noise_per_client=PER_CLIENT,
        accountant=accountant,
    )


def client_event(m: int) -> dp_accounting.DpEvent:
    """The tutorial's mechanism at m clients per round, built without bench.accounting."""
    gaussian = dp_accounting.GaussianDpEvent(PER_CLIENT * m)
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(m / TOTAL, gaussian), ROUNDS)


# --- epsilon_curve -------------------------------------------------------------------------------------------------

Q, SIGMA = 50 / TOTAL, 1.0


@pytest.fixture(scope="module")
def curve() -> list[Epsilons]:
    return epsilon_curve(sample_rate=Q, noise_multiplier=SIGMA, steps=range(1, ROUNDS + 1), delta=DELTA)


@pytest.mark.parametrize("rounds", [1, 37, 100])
def test_curve_agrees_with_a_fresh_accountant(curve, rounds):
    """Same grid, same pessimistic rounding: only FFT round-off and 1e-15 tail truncation per
    composition separate k one-step compositions from one `self_compose(k)` (~1e-10 here)."""
    fresh = epsilon(sample_rate=Q, noise_multiplier=SIGMA, steps=rounds, delta=DELTA)
    point = curve[rounds - 1]
    assert point.pld == pytest.approx(fresh.pld, rel=1e-6)
    assert point.rdp == fresh.rdp  # RDP composes additively: k times one step, exactly as the accountant does


def test_curve_is_one_row_per_round_and_non_decreasing(curve):
    assert len(curve) == ROUNDS
    for a, b in zip(curve, curve[1:]):
        assert b.pld >= a.pld and b.rdp >= a.rdp
    assert all(0 < e.pld <= e.rdp for e in curve)
    assert curve[-1].pld > 2 * curve[0].pld


def test_curve_with_gaps_repeats_and_zero():
    steps = [0, 1, 6, 6, 30]
    points = epsilon_curve(sample_rate=0.02, noise_multiplier=1.2, steps=steps, delta=DELTA)
    assert points[0] == Epsilons(pld=0.0, rdp=0.0)
    assert points[2] == points[3]
    for k, point in zip(steps[1:], points[1:]):
        fresh = epsilon(sample_rate=0.02, noise_multiplier=1.2, steps=k, delta=DELTA)
        assert point.pld == pytest.approx(fresh.pld, rel=1e-6)
        assert point.rdp == fresh.rdp


def test_curve_full_batch_is_the_analytic_gaussian():
    """Every client every round: the analytic Gaussian (Balle & Wang 2018), within PLD's ~1e-8 of `epsilon`."""
    points = epsilon_curve(sample_rate=1.0, noise_multiplier=5.0, steps=[0, 1, 100], delta=DELTA)
    assert points[0] == Epsilons(pld=0.0, rdp=0.0)
    for k, point in zip([1, 100], points[1:]):
        fresh = epsilon(sample_rate=1.0, noise_multiplier=5.0, steps=k, delta=DELTA)
        assert point.pld == pytest.approx(fresh.pld, rel=1e-6) and point.pld <= fresh.pld
        assert point.rdp == fresh.rdp


def test_curve_without_noise_is_infinite_and_empty_is_empty():
    points = epsilon_curve(sample_rate=0.01, noise_multiplier=0.0, steps=[1, 2], delta=DELTA)
    assert all(math.isinf(e.pld) and math.isinf(e.rdp) for e in points)
    assert epsilon_curve(sample_rate=0.01, noise_multiplier=1.0, steps=[], delta=DELTA) == []


@pytest.mark.parametrize("steps", [[3, 2], [-1, 2], [1.5]])
def test_curve_rejects_decreasing_negative_or_fractional_steps(steps):
    with pytest.raises(ValueError, match="non-decreasing integers"):
        epsilon_curve(sample_rate=0.01, noise_multiplier=1.0, steps=steps, delta=DELTA)


# --- calibrate_clients: the tutorial -------------------------------------------------------------------------------


def test_rdp_reproduces_the_tutorial_exactly():
    """The tutorial (TF Privacy RDP) reports 120 clients at noise multiplier 1.2."""
    result = tutorial("rdp")
    assert result.clients_per_round == 120
    assert result.noise_multiplier == pytest.approx(1.2, rel=1e-12)
    assert result.epsilon == pytest.approx(1.98611, abs=1e-5)
    assert result.accountant == "rdp"


def test_pld_needs_fewer_clients_than_rdp():
    result = tutorial("pld")
    assert result.clients_per_round == 104
    assert result.noise_multiplier == pytest.approx(1.04, rel=1e-12)
    assert result.epsilon == pytest.approx(1.98460, abs=1e-4)
    assert result.epsilon <= TARGET


def test_calibration_checked_with_dp_accounting_directly():
    """Independently of bench.accounting: the found m meets the target and m - 1 misses it,
    RDP with the tutorial's own orders, PLD at dp-accounting's default grid."""
    m_rdp = tutorial("rdp").clients_per_round
    rdp_eps = {
        m: rdp.RdpAccountant(TUTORIAL_ORDERS).compose(client_event(m)).get_epsilon(DELTA) for m in (m_rdp - 1, m_rdp)
    }
    assert rdp_eps[m_rdp] <= TARGET < rdp_eps[m_rdp - 1]

    m_pld = tutorial("pld").clients_per_round
    pld_eps = {m: pld.PLDAccountant().compose(client_event(m)).get_epsilon(DELTA) for m in (m_pld - 1, m_pld)}
    assert pld_eps[m_pld] <= TARGET < pld_eps[m_pld - 1]
    assert pld_eps[m_pld] == pytest.approx(tutorial("pld").epsilon, rel=1e-9)


def test_the_tutorials_result_needs_the_improved_rdp_conversion():
    """With the classic conversion eps = min(rdp - log(delta) / (alpha - 1)) (Mironov 2017), 120 clients give
    ~2.42 > 2; the tutorial's 120 matches the improved one (Canonne et al. 2020), which dp-accounting uses."""
    orders = np.array(TUTORIAL_ORDERS)
    rdp_120 = rdp.RdpAccountant(TUTORIAL_ORDERS).compose(client_event(120)).rdp
    assert np.min(rdp_120 - np.log(DELTA) / (orders - 1)) > 2.4


def test_epsilon_decreases_as_clients_grow_with_the_noise():
    """Bisection needs epsilon monotone in m when z = c m (see calibrate_clients' docstring)."""
    ms = [30, 60, 104, 120, 250, 500, 1000, 2000, TOTAL]
    rdp_eps = [rdp.RdpAccountant(TUTORIAL_ORDERS).compose(client_event(m)).get_epsilon(DELTA) for m in ms]
    assert all(b < a for a, b in zip(rdp_eps, rdp_eps[1:]))
    coarse = [pld.PLDAccountant(value_discretization_interval=1e-3).compose(client_event(m)) for m in ms[1:]]
    pld_eps = [a.get_epsilon(DELTA) for a in coarse]
    assert all(b < a for a, b in zip(pld_eps, pld_eps[1:]))


# --- calibrate_clients: other cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_unreachable_target_raises(accountant):
    """With every client in every round the tutorial's setting gives epsilon ~1.11 (PLD), ~1.22 (RDP)."""
    with pytest.raises(CalibrationError, match=f"out of reach with {accountant.upper()} even with all 3383 clients"):
        calibrate_clients(
            target_epsilon=1.0,
            delta=DELTA,
            rounds=ROUNDS,
            total_clients=TOTAL,
            noise_per_client=PER_CLIENT,
            accountant=accountant,
        )


def test_pld_reaches_targets_that_rdp_cannot():
    kwargs = {"target_epsilon": 1.15, "delta": DELTA, "rounds": ROUNDS, "total_clients": TOTAL}
    with pytest.raises(CalibrationError):
        calibrate_clients(**kwargs, noise_per_client=PER_CLIENT, accountant="rdp")
    result = calibrate_clients(**kwargs, noise_per_client=PER_CLIENT, accountant="pld")
    assert 500 < result.clients_per_round < TOTAL and result.epsilon <= 1.15


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_one_client_suffices_with_lots_of_noise(accountant):
    result = calibrate_clients(
        target_epsilon=2.0, delta=DELTA, rounds=10, total_clients=100, noise_per_client=5.0, accountant=accountant
    )
    assert result.clients_per_round == 1 and result.noise_multiplier == 5.0 and result.epsilon <= 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"accountant": "renyi"},
        {"rounds": 0},
        {"total_clients": 0},
        {"noise_per_client": 0.0},
        {"delta": 0.0},
    ],
)
def test_calibration_rejects_bad_arguments(kwargs):
    base = {
        "target_epsilon": TARGET,
        "delta": DELTA,
        "rounds": ROUNDS,
        "total_clients": TOTAL,
        "noise_per_client": PER_CLIENT,
    }
    with pytest.raises(ValueError):
        calibrate_clients(**{**base, **kwargs})
