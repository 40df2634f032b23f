"""One accountant for every backend, from Google's dp-accounting.

DP-SGD with Poisson sampling is the Poisson-subsampled Gaussian mechanism composed over
steps. PLD accounting (Koskela et al. 2020; Doroshenko et al. 2022, "Connect the Dots")
is the tight headline; RDP (Mironov 2017; Mironov et al. 2019) is reported beside it
because most papers still quote it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import pld, rdp

absl_logging.set_verbosity(absl_logging.ERROR)  # RDP's per-order convergence chatter

PLD_DISCRETIZATION = 1e-4
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512])


class CalibrationError(ValueError):
    """The target epsilon cannot be reached with the given sampling rate and steps."""


@dataclass(frozen=True, kw_only=True)
class Epsilons:
    pld: float
    rdp: float


def _event(sample_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    sampled = dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian) if sample_rate < 1 else gaussian
    return dp_accounting.SelfComposedDpEvent(sampled, steps)


def _pld() -> pld.PLDAccountant:
    return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def _pld_coarse() -> pld.PLDAccountant:
    """Ten times coarser, so much faster; discretisation only ever over-estimates epsilon."""
    return pld.PLDAccountant(value_discretization_interval=10 * PLD_DISCRETIZATION)


def _rdp() -> rdp.RdpAccountant:
    return rdp.RdpAccountant(list(RDP_ORDERS))


def epsilon(*, sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> Epsilons:
    """(epsilon_pld, epsilon_rdp) after `steps` steps; inf without noise."""
    if noise_multiplier <= 0:
        return Epsilons(pld=math.inf, rdp=math.inf)
    if steps == 0:
        return Epsilons(pld=0.0, rdp=0.0)
    event = _event(sample_rate, noise_multiplier, steps)
    return Epsilons(
        pld=float(_pld().compose(event).get_epsilon(delta)),
        rdp=float(_rdp().compose(event).get_epsilon(delta)),
    )


def epsilon_per_epoch(
    *, sample_rate: float, noise_multiplier: float, steps_per_epoch: int, epochs: int, delta: float
) -> list[Epsilons]:
    """Epsilon after each epoch, each from a fresh accountant (same numbers as `epsilon`)."""
    return [
        epsilon(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=e * steps_per_epoch, delta=delta)
        for e in range(1, epochs + 1)
    ]


def _calibrate(make, target_epsilon: float, sample_rate: float, steps: int, delta: float, lo: float, hi: float):
    return float(
        dp_accounting.calibrate_dp_mechanism(
            make,
            lambda s: _event(sample_rate, s, steps),
            target_epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(lo, hi),
            tol=1e-4,
        )
    )


def calibrate_noise(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """The smallest noise multiplier whose epsilon after `steps` is at most `target_epsilon`.

    RDP is calibrated first (cheap at any sigma); its sigma bounds PLD's from above, since
    PLD's epsilon is never larger, which keeps the PLD search away from tiny sigmas. The
    PLD search runs on a coarser grid, whose pessimism only errs towards more noise.
    """
    if accountant not in ("pld", "rdp"):
        raise ValueError(f"accountant: got {accountant!r}, expected 'pld' or 'rdp'")
    upper = 500.0
    if _rdp().compose(_event(sample_rate, upper, steps)).get_epsilon(delta) > target_epsilon:
        raise CalibrationError(
            f"epsilon {target_epsilon:g} at delta {delta:g} is out of reach even with noise multiplier "
            f"{upper:g} (sample rate {sample_rate:g}, {steps} steps)"
        )
    sigma_rdp = _calibrate(_rdp, target_epsilon, sample_rate, steps, delta, 1e-2, upper)
    if accountant == "rdp":
        return sigma_rdp
    hi = sigma_rdp * 1.001
    lo = max(0.5 * sigma_rdp, 0.05)
    if _pld_coarse().compose(_event(sample_rate, lo, steps)).get_epsilon(delta) <= target_epsilon:
        return lo
    return _calibrate(_pld_coarse, target_epsilon, sample_rate, steps, delta, lo, hi)
