"""bench.accounting against dp-accounting used directly, plus monotonicity and calibration round trips."""

from __future__ import annotations

import functools
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from bench.accounting import CalibrationError, Epsilons, calibrate_noise, epsilon, epsilon_per_epoch

DELTA = 1e-5

# Calibration is slow-ish; tests that ask for the same calibration share one result.
calibrated = functools.lru_cache(maxsize=None)(calibrate_noise)


def reference(q: float, sigma: float, steps: int, delta: float) -> tuple[float, float]:
    """(PLD, RDP) epsilon computed independently of bench.accounting."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    eps_pld = pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(delta)
    eps_rdp = rdp.RdpAccountant().compose(event).get_epsilon(delta)
    return eps_pld, eps_rdp


def test_opacus_mnist_reference_setting():
    """q = 256/60000, sigma 1.1, 60 epochs of round(1/q) = 234 steps, delta 1e-5."""
    q = 256 / 60_000
    steps_per_epoch = round(1 / q)
    assert steps_per_epoch == 234
    steps = 60 * steps_per_epoch
    ref_pld, ref_rdp = reference(q, 1.1, steps, DELTA)
    assert 2.3 < ref_pld < 2.45 and 2.5 < ref_rdp < 2.7  # sanity of the reference itself

    eps = epsilon(sample_rate=q, noise_multiplier=1.1, steps=steps, delta=DELTA)
    assert isinstance(eps, Epsilons)
    assert eps.pld == pytest.approx(ref_pld, rel=1e-6)
    assert eps.rdp == pytest.approx(ref_rdp, rel=0.02)
    assert eps.pld <= eps.rdp


@pytest.mark.parametrize(
    "q, sigma, steps",
    [(0.01, 1.0, 100), (0.1, 2.0, 50), (0.004, 0.8, 500), (0.5, 3.0, 4)],
)
def test_matches_reference_on_other_settings(q, sigma, steps):
    ref_pld, ref_rdp = reference(q, sigma, steps, DELTA)
    eps = epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=DELTA)
    assert eps.pld == pytest.approx(ref_pld, rel=1e-6)
    assert eps.rdp == pytest.approx(ref_rdp, rel=0.02)
    assert eps.pld <= eps.rdp


def test_full_batch_is_the_plain_gaussian_mechanism():
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(5.0), 10)
    ref = pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(DELTA)
    ref_rdp = rdp.RdpAccountant().compose(event).get_epsilon(DELTA)
    eps = epsilon(sample_rate=1.0, noise_multiplier=5.0, steps=10, delta=DELTA)
    assert eps.pld == pytest.approx(ref, rel=1e-6)
    assert eps.rdp == pytest.approx(ref_rdp, rel=0.02)


def test_no_noise_is_infinite_epsilon():
    eps = epsilon(sample_rate=0.01, noise_multiplier=0.0, steps=100, delta=DELTA)
    assert math.isinf(eps.pld) and math.isinf(eps.rdp) and eps.pld > 0


def test_zero_steps_is_zero_epsilon():
    assert epsilon(sample_rate=0.01, noise_multiplier=1.0, steps=0, delta=DELTA) == Epsilons(pld=0.0, rdp=0.0)


def test_epsilon_monotone_in_noise_steps_and_delta():
    q = 0.01
    base = epsilon(sample_rate=q, noise_multiplier=1.0, steps=200, delta=DELTA)
    more_noise = epsilon(sample_rate=q, noise_multiplier=1.5, steps=200, delta=DELTA)
    more_steps = epsilon(sample_rate=q, noise_multiplier=1.0, steps=400, delta=DELTA)
    larger_delta = epsilon(sample_rate=q, noise_multiplier=1.0, steps=200, delta=1e-3)
    higher_rate = epsilon(sample_rate=2 * q, noise_multiplier=1.0, steps=200, delta=DELTA)
    for eps in (base, more_noise, more_steps, larger_delta, higher_rate):
        assert 0 < eps.pld <= eps.rdp
    assert more_noise.pld < base.pld and more_noise.rdp < base.rdp
    assert more_steps.pld > base.pld and more_steps.rdp > base.rdp
    assert larger_delta.pld < base.pld and larger_delta.rdp < base.rdp
    assert higher_rate.pld > base.pld and higher_rate.rdp > base.rdp


def test_epsilon_per_epoch_is_non_decreasing_and_matches_epsilon():
    q, sigma, spe, epochs = 0.02, 1.0, 50, 3
    per_epoch = epsilon_per_epoch(
        sample_rate=q, noise_multiplier=sigma, steps_per_epoch=spe, epochs=epochs, delta=DELTA
    )
    assert len(per_epoch) == epochs
    for a, b in zip(per_epoch, per_epoch[1:], strict=False):
        assert b.pld >= a.pld and b.rdp >= a.rdp
    assert per_epoch[-1].pld > per_epoch[0].pld
    for eps in per_epoch:
        assert eps.pld <= eps.rdp
    last = epsilon(sample_rate=q, noise_multiplier=sigma, steps=epochs * spe, delta=DELTA)
    assert per_epoch[-1] == last
    assert per_epoch[0].pld == pytest.approx(reference(q, sigma, spe, DELTA)[0], rel=1e-6)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("target, q, steps", [(1.0, 0.01, 200), (3.0, 0.02, 100)])
def test_calibration_round_trip(accountant, target, q, steps):
    sigma = calibrated(target_epsilon=target, sample_rate=q, steps=steps, delta=DELTA, accountant=accountant)
    assert sigma > 0
    eps = epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=DELTA)
    achieved = eps.pld if accountant == "pld" else eps.rdp
    assert achieved <= target
    assert achieved >= 0.97 * target


def test_rdp_calibration_inverts_epsilon():
    q, steps = 0.01, 200
    target = epsilon(sample_rate=q, noise_multiplier=1.1, steps=steps, delta=DELTA).rdp
    sigma = calibrate_noise(target_epsilon=target, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    assert sigma == pytest.approx(1.1, abs=2e-3)


def test_pld_calibration_needs_less_noise_than_rdp():
    kwargs = {"target_epsilon": 1.0, "sample_rate": 0.01, "steps": 200, "delta": DELTA}
    assert calibrated(**kwargs, accountant="pld") < calibrated(**kwargs, accountant="rdp")


def test_calibration_more_steps_more_noise():
    kwargs = {"target_epsilon": 2.0, "sample_rate": 0.01, "delta": DELTA, "accountant": "rdp"}
    assert calibrate_noise(steps=400, **kwargs) > calibrate_noise(steps=100, **kwargs)


@pytest.mark.parametrize("target", [1e-6, 1e-3])
def test_unreachable_target_raises_calibration_error(target):
    with pytest.raises(CalibrationError):
        calibrate_noise(target_epsilon=target, sample_rate=0.01, steps=1_000, delta=DELTA)
    assert issubclass(CalibrationError, ValueError)


def test_calibration_rejects_unknown_accountant():
    with pytest.raises(ValueError):
        calibrate_noise(target_epsilon=3.0, sample_rate=0.02, steps=100, delta=DELTA, accountant="renyi")
