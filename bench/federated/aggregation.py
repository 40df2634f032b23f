"""DP-FedAvg aggregation and the server optimizer, owned by the core and identical for every backend.

User-level DP (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"): each
sampled client's model delta is clipped to L2 norm C, the sum gets N(0, (z C)^2) noise per coordinate and
is divided by the *expected* number of clients. Adaptive clipping moves C geometrically towards a quantile
of the clients' update norms (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"), exactly as TensorFlow Privacy's QuantileAdaptiveClipSumQuery with geometric update and as
TFF's `DifferentiallyPrivateFactory.gaussian_adaptive` configures it. Models are dicts name -> float32 array.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.spec import AdaptiveClipping, OptimizerSpec

Params = Mapping[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class AggregatorState:
    """What the aggregator carries between rounds: the clip norm to use next round."""

    clip_norm: float


@dataclass(frozen=True, kw_only=True)
class RoundStats:
    """One round's aggregation figures: `unclipped_fraction` is the true (un-noised) fraction of sampled
    clients with norm <= clip_norm (nan when none was sampled); `clip_norm` is the clip used this round."""

    sampled: int
    clip_norm: float
    unclipped_fraction: float
    mean_norm: float


def update_norm(delta: Params) -> float:
    """Global L2 norm over all arrays of a model delta, computed in float64."""
    return math.sqrt(sum(float(np.vdot(a, a)) for a in (np.asarray(v, np.float64) for v in delta.values())))


def _scale(norm: float, clip_norm: float) -> float:
    """min(1, C / norm), with a zero delta left as it is (TF's clip_by_global_norm)."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip(delta: Params, clip_norm: float) -> dict[str, np.ndarray]:
    """The delta scaled by min(1, clip_norm / norm) so its global L2 norm is at most clip_norm."""
    s = _scale(update_norm(delta), clip_norm)
    return {k: (np.asarray(v, np.float64) * s).astype(np.float32) for k, v in delta.items()}


def value_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier on the clipped sum that leaves the run's total z with the noised clipped count
    as the second Gaussian query: (z^-2 - (2 count_stddev)^-2)^-1/2 (Andrew et al. 2021, section 3.1)."""
    z = noise_multiplier
    if z < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {z}")
    if z == 0:
        return 0.0
    if z >= 2 * count_stddev:
        raise ValueError(
            f"noise_multiplier {z:g} needs adaptive_clipping.count_stddev above {z / 2:g} (it is {count_stddev:g};"
            " default clients_per_round / 20): the noised count of unclipped clients would alone spend more than"
            " the run's privacy budget. Raise adaptive_clipping.count_stddev (or clients_per_round) or lower"
            " noise_multiplier."
        )
    return (z**-2 - (2 * count_stddev) ** -2) ** -0.5


def noise_params(
    noise_multiplier: float, *, expected_clients: float, adaptive: AdaptiveClipping | None
) -> tuple[float, float]:
    """(value noise multiplier, count stddev) for a run of total noise multiplier z, as TFF's
    `adaptive_clip_noise_params`: count stddev defaults to expected_clients / 20; z = 0 gives (0, 0)."""
    if noise_multiplier == 0:
        return 0.0, 0.0
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if adaptive is None:
        return float(noise_multiplier), 0.0
    count_stddev = adaptive.count_stddev if adaptive.count_stddev is not None else expected_clients / 20
    return value_noise_multiplier(noise_multiplier, count_stddev), float(count_stddev)


def _noise(rng: np.random.Generator, like: Params, stddev: float) -> dict[str, np.ndarray]:
    """float64 N(0, stddev^2) per coordinate, drawn array by array in `like`'s key order."""
    if stddev == 0:
        return {k: np.zeros(np.shape(v), np.float64) for k, v in like.items()}
    return {k: rng.normal(0.0, stddev, size=np.shape(v)) for k, v in like.items()}


def aggregate(
    deltas: Sequence[Params],
    state: AggregatorState,
    *,
    dp: bool,
    noise_multiplier: float,
    expected_clients: float,
    adaptive: AdaptiveClipping | None,
    rng: np.random.Generator,
    like: Params,
) -> tuple[dict[str, np.ndarray], AggregatorState, RoundStats]:
    """One round's server update (the noised mean delta), the next state and the round's figures.

    DP: each delta clipped to this round's C, summed, N(0, (v C)^2) added per coordinate (v from
    `noise_params`), divided by `expected_clients`. With `adaptive`, C_next = C exp(-lr (b - target)),
    b = clip01((sum_i (1[norm_i <= C] - 1/2) + N(0, count_stddev^2)) / expected_clients + 1/2) (TF Privacy's
    QuantileEstimatorQuery, geometric update). Without dp: the plain sum / expected_clients. Noise is drawn
    from `rng`: the value noise array by array in `like`'s key order, then the count noise.
    """
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be positive, got {expected_clients}")
    keys = list(like)
    for d in deltas:
        if set(d) != set(keys):
            raise ValueError(f"a client delta has arrays {sorted(d)}, expected {sorted(keys)}")
    c = float(state.clip_norm)
    norms = np.array([update_norm(d) for d in deltas], dtype=np.float64)
    unclipped = norms <= c
    stats = RoundStats(
        sampled=len(deltas),
        clip_norm=c,
        unclipped_fraction=float(unclipped.mean()) if len(deltas) else math.nan,
        mean_norm=float(norms.mean()) if len(deltas) else math.nan,
    )
    if dp:
        value_nm, count_stddev = noise_params(noise_multiplier, expected_clients=expected_clients, adaptive=adaptive)
        scales = [_scale(n, c) for n in norms]
        total = _noise(rng, like, value_nm * c)
    else:
        scales = [1.0] * len(deltas)
        total = {k: np.zeros(np.shape(v), np.float64) for k, v in like.items()}
    for d, s in zip(deltas, scales):
        for k in keys:
            total[k] += np.asarray(d[k], np.float64) * s
    update = {k: (v / expected_clients).astype(np.float32) for k, v in total.items()}
    if not dp or adaptive is None:
        return update, state, stats
    count = float(np.sum(unclipped - 0.5)) + (rng.normal(0.0, count_stddev) if count_stddev > 0 else 0.0)
    below = min(1.0, max(0.0, count / expected_clients + 0.5))
    new_clip = max(0.0, c * math.exp(-adaptive.learning_rate * (below - adaptive.target_quantile)))
    return update, AggregatorState(clip_norm=new_clip), stats


@dataclass(frozen=True, kw_only=True)
class ServerState:
    """The server optimizer's state, as torch keeps it: `step` count, SGD momentum buffers (empty before
    the first step), Adam's first and second moments."""

    step: int = 0
    momentum: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)


def init_server_state(params: Params, opt: OptimizerSpec) -> ServerState:
    """The server optimizer's state before the first round."""
    if opt.name == "adam":
        zeros = {k: np.zeros_like(v, dtype=np.float32) for k, v in params.items()}
        return ServerState(exp_avg=zeros, exp_avg_sq={k: z.copy() for k, z in zeros.items()})
    return ServerState()


def server_step(
    params: Params, update: Params, state: ServerState, opt: OptimizerSpec
) -> tuple[dict[str, np.ndarray], ServerState]:
    """Apply the aggregated mean delta with the server optimizer (Reddi et al. 2021, "Adaptive Federated
    Optimization"): pseudo-gradient g = -update, then torch.optim.SGD / Adam semantics (coupled weight decay)."""
    f32 = np.float32
    lr, wd = f32(opt.learning_rate), f32(opt.weight_decay)
    step = state.step + 1
    new_params, momentum, exp_avg, exp_avg_sq = {}, {}, {}, {}
    for k, p in params.items():
        p = np.asarray(p, f32)
        g = -np.asarray(update[k], f32)
        if opt.weight_decay:
            g = g + wd * p
        if opt.name == "adam":
            b1, b2 = f32(opt.beta1), f32(opt.beta2)
            m = b1 * state.exp_avg[k] + (1 - b1) * g
            v = b2 * state.exp_avg_sq[k] + (1 - b2) * g * g
            bias1, bias2 = 1 - opt.beta1**step, 1 - opt.beta2**step
            denom = np.sqrt(v) / f32(math.sqrt(bias2)) + f32(opt.eps)
            new_params[k] = p - f32(opt.learning_rate / bias1) * (m / denom)
            exp_avg[k], exp_avg_sq[k] = m, v
        elif opt.momentum:
            buf = g.copy() if k not in state.momentum else f32(opt.momentum) * state.momentum[k] + g
            new_params[k] = p - lr * buf
            momentum[k] = buf
        else:
            new_params[k] = p - lr * g
    return new_params, ServerState(step=step, momentum=momentum, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
