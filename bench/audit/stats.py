"""The statistics of privacy audits: small pure functions of scores and counts (numpy, scipy, dp-accounting).

Two kinds of evidence are scored here:

- A *step audit* (Nasr et al. 2021, "Adversary Instantiation: Lower Bounds for Differentially Private Machine
  Learning"; Nasr et al. 2023, "Tight Auditing of Differentially Private Machine Learning") observes many
  trials of one DP-SGD step with a canary in or out and gets one score per trial. `fit_mu` estimates the
  Gaussian-DP parameter mu from them; `epsilon_split` gives an assumption-free (epsilon, delta) lower bound.
- A *one-run audit* (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run") guesses
  which of m canaries, each included with probability 1/2, were trained on. `epsilon_one_run` turns the
  number of correct guesses into an epsilon lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

# The largest epsilon any bound here reports: beyond it the search stops (a blatant leak, as good as infinite).
EPSILON_MAX = 100.0


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon at `delta` of a mu-GDP mechanism: one Gaussian step with noise multiplier 1/mu (exact; dp-accounting).

    Args:
      mu: the Gaussian-DP parameter (sensitivity over noise standard deviation); 0 means no leak at all.
      delta: the delta of the (epsilon, delta) guarantee.

    Returns:
      The smallest epsilon such that the mechanism is (epsilon, delta)-DP; `math.inf` for mu = inf.
    """
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    return float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))


@dataclass(frozen=True, kw_only=True)
class MuFit:
    """mu-hat with its two-sided 95% interval and its one-sided lower bound at the audit's significance."""

    mu: float
    low: float
    high: float
    lower_bound: float  # one-sided, at the significance `fit_mu` was given
    n_in: int
    n_out: int


def fit_mu(scores_in: np.ndarray, scores_out: np.ndarray, significance: float) -> MuFit:
    """Gaussian-DP mu from in/out scores: the gap of the means over the pooled standard deviation.

    For a Gaussian mechanism the scores are N(mu, 1) and N(0, 1) in units of the noise, so this is the
    standardised mean difference; its standard error is the large-sample one of Hedges & Olkin (1985),
    sqrt(1/n_in + 1/n_out + mu^2 / (2 (n_in + n_out))).

    Args:
      scores_in: scores of the trials that included the canary.
      scores_out: scores of the trials that did not.
      significance: one minus the confidence of `lower_bound` (one-sided).

    Returns:
      The fit; every field is NaN when either side has fewer than two trials.
    """
    a, b = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    n1, n0 = len(a), len(b)
    if n1 < 2 or n0 < 2:
        nan = float("nan")
        return MuFit(mu=nan, low=nan, high=nan, lower_bound=nan, n_in=n1, n_out=n0)
    pooled = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n0 - 1) * b.var(ddof=1)) / (n1 + n0 - 2))
    mu = (a.mean() - b.mean()) / pooled if pooled > 0 else math.copysign(math.inf, a.mean() - b.mean())
    if math.isinf(mu):
        return MuFit(mu=mu, low=mu, high=mu, lower_bound=mu, n_in=n1, n_out=n0)
    se = math.sqrt(1 / n1 + 1 / n0 + mu * mu / (2 * (n1 + n0)))
    z95 = scipy.stats.norm.isf(0.025)
    lower = mu - scipy.stats.norm.isf(significance) * se
    return MuFit(
        mu=float(mu), low=float(mu - z95 * se), high=float(mu + z95 * se), lower_bound=float(lower), n_in=n1, n_out=n0
    )


def _cp_lower(k: int, n: int, significance: float) -> float:
    """One-sided Clopper-Pearson lower bound of a binomial proportion."""
    return 0.0 if k == 0 else float(scipy.stats.beta.ppf(significance, k, n - k + 1))


def _cp_upper(k: int, n: int, significance: float) -> float:
    """One-sided Clopper-Pearson upper bound of a binomial proportion."""
    return 1.0 if k == n else float(scipy.stats.beta.ppf(1 - significance, k + 1, n - k))


def _epsilon_at(tp: int, n_in: int, fp: int, n_out: int, delta: float, significance: float) -> float:
    """log((TPR_low - delta) / FPR_high) for the test "in when score >= t", each bound at significance / 2."""
    tpr = _cp_lower(tp, n_in, significance / 2)
    fpr = _cp_upper(fp, n_out, significance / 2)
    if tpr <= delta:
        return 0.0
    return max(0.0, math.log(tpr - delta) - math.log(fpr))


def _counts_at(a: np.ndarray, b: np.ndarray, t: float) -> tuple[int, int]:
    return int((a >= t).sum()), int((b >= t).sum())


@dataclass(frozen=True, kw_only=True)
class SplitBound:
    """An (epsilon, delta) lower bound from a threshold chosen on one half of the trials, scored on the other."""

    epsilon: float
    ceiling: float  # the largest bound these trial counts could give (every guess right)
    threshold: float


def epsilon_split(
    scores_in: np.ndarray, scores_out: np.ndarray, delta: float, significance: float = 0.05
) -> SplitBound:
    """Assumption-free epsilon lower bound of a membership test, with Clopper-Pearson intervals.

    The trials are split in halves (even and odd positions, which are exchangeable): on the first the
    threshold with the largest bound is chosen, on the second that threshold's bound is computed, so the
    choice costs no correction. The test guesses "in" when the score is at or above the threshold.

    Args:
      scores_in, scores_out: scores of trials with and without the canary, in trial order.
      delta: the delta of the claim.
      significance: one minus the confidence of the bound (split evenly between TPR and FPR).

    Returns:
      The bound, the best any threshold could reach on the scoring half, and the threshold.
    """
    a, b = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    a1, a2, b1, b2 = a[0::2], a[1::2], b[0::2], b[1::2]
    if min(len(a1), len(a2), len(b1), len(b2)) == 0:
        return SplitBound(epsilon=0.0, ceiling=0.0, threshold=float("nan"))
    best, threshold = -1.0, math.inf
    for t in np.unique(np.concatenate([a1, b1])):
        tp, fp = _counts_at(a1, b1, t)
        e = _epsilon_at(tp, len(a1), fp, len(b1), delta, significance)
        if e > best:
            best, threshold = e, float(t)
    tp, fp = _counts_at(a2, b2, threshold)
    return SplitBound(
        epsilon=_epsilon_at(tp, len(a2), fp, len(b2), delta, significance),
        ceiling=_epsilon_at(len(a2), len(a2), 0, len(b2), delta, significance),
        threshold=threshold,
    )


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least `correct` of `guesses` right] under an (epsilon, delta)-DP algorithm, m canaries (Steinke et al.
    2023, Theorem 5.2): a binomial tail at the accuracy of epsilon-randomised response, plus delta's share.

    Args:
      m: canaries, each included independently with probability 1/2.
      guesses: guesses made (abstentions excluded).
      correct: guesses that were right.
      epsilon, delta: the guarantee under test.

    Returns:
      The p-value; a small one rejects the guarantee.
    """
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({m})")
    q = float(scipy.special.expit(epsilon))
    tail = float(scipy.stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return tail
    shortfall = np.arange(1, correct + 1)
    slack = scipy.stats.binom.sf(correct - shortfall - 1, guesses, q) - tail
    return min(1.0, tail + float(np.max(slack / shortfall)) * delta * 2 * m)


def epsilon_one_run(
    m: int, guesses: int, correct: int, delta: float, significance: float = 0.05, *, at_least: float = 0.0
) -> float:
    """The largest epsilon whose (epsilon, delta) claim `correct` of `guesses` right rejects at `significance`.

    Returns 0 when not even epsilon = 0 is rejected, and EPSILON_MAX when no epsilon up to it survives.
    `at_least`: answer max(that, the bound) and search no lower (a search over many thresholds skips fast).
    """

    def rejected_by(eps: float) -> float:
        return significance - one_run_p_value(m, guesses, correct, eps, delta)

    if guesses == 0 or rejected_by(at_least) <= 0:
        return at_least
    if rejected_by(EPSILON_MAX) > 0:
        return EPSILON_MAX
    return float(scipy.optimize.brentq(rejected_by, at_least, EPSILON_MAX, xtol=1e-7))


def one_run_ceiling(m: int, guesses: int, delta: float, significance: float = 0.05) -> float:
    """The most a one-run audit with m canaries and this many guesses can show: every guess right."""
    return epsilon_one_run(m, guesses, guesses, delta, significance)


@dataclass(frozen=True, kw_only=True)
class Guesses:
    """The one-run audit's guesses: `guesses` made, `correct` of them right."""

    guesses: int
    correct: int


def top_bottom_guesses(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> Guesses:
    """Guess "in" for the k_in highest scores and "out" for the k_out lowest, abstain on the rest.

    Ties are broken by canary index, so the guesses depend on the scores and order only, never on `included`.
    """
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    if k_in + k_out > len(scores):
        raise ValueError(f"{k_in} + {k_out} guesses for {len(scores)} canaries")
    order = np.lexsort((np.arange(len(scores)), -scores))  # highest first
    correct = int(included[order[:k_in]].sum()) + int((~included[order[len(scores) - k_out :]]).sum())
    return Guesses(guesses=k_in + k_out, correct=correct)


def roc_hull(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds, and the in- and out-scores at or above each, at the vertices of the ROC curve's concave hull.

    Only the hull's vertices can be the best threshold of a test "in when score >= t" (a point under the hull
    is beaten by mixing its neighbours), so the all-threshold search below needs only these.
    """
    a, b = np.sort(np.asarray(scores_in, np.float64)), np.sort(np.asarray(scores_out, np.float64))
    thresholds = np.concatenate([np.union1d(a, b), [np.inf]])
    below_in = np.searchsorted(a, thresholds, side="left")  # false negatives at each threshold
    below_out = np.searchsorted(b, thresholds, side="left")  # true negatives
    hull: list[int] = []
    for i in range(len(thresholds)):
        while len(hull) >= 2:
            j, k = hull[-2], hull[-1]
            turn = (below_in[k] - below_in[j]) * (below_out[i] - below_out[j]) - (below_out[k] - below_out[j]) * (
                below_in[i] - below_in[j]
            )
            if turn < 0:
                break
            hull.pop()  # k lies on or under the chord from j to i
        hull.append(i)
    idx = np.asarray(hull)
    return thresholds[idx], len(a) - below_in[idx], len(b) - below_out[idx]


def epsilon_one_run_all_thresholds(
    scores_in: np.ndarray, scores_out: np.ndarray, delta: float, significance: float = 0.05
) -> float:
    """Steinke et al.'s bound at the best threshold for one-sided guesses ("in" when score >= t, no "out" guess),
    Bonferroni-corrected over the thresholds of the ROC hull.

    Used to check this implementation against published reference values; the audits themselves fix their
    guesses in advance (`top_bottom_guesses`), which needs no correction.
    """
    _, tp, fp = roc_hull(scores_in, scores_out)
    m = len(scores_in) + len(scores_out)
    level = significance / len(tp)
    # Most precise thresholds first, so that the rest mostly fail the cheap test at the best bound so far.
    precision = np.array([_cp_lower(t, t + f, significance) if t + f else 0.0 for t, f in zip(tp, fp)])
    best = 0.0
    for i in np.argsort(-precision, kind="stable"):
        t, f = int(tp[i]), int(fp[i])
        if t + f == 0 or t / (t + f) <= scipy.special.expit(best):
            continue  # its precision is under the accuracy that `best` already allows: it cannot reject more
        best = epsilon_one_run(m, t + f, t, delta, level, at_least=best)
    return best
