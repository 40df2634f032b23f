"""bench.federated.partition and bench.federated.aggregation: clients, sampling, batching plans, DP-FedAvg
aggregation with adaptive clipping (Andrew et al. 2021) and the server optimizer.

Statistical checks use fixed seeds (deterministic) with tolerances of several standard errors, so a correct
implementation passes with room to spare and a wrong one (wrong noise scale, wrong quantile) fails.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from bench.federated.aggregation import (
    AggregatorState,
    ServerState,
    aggregate,
    clip,
    init_server_state,
    noise_params,
    server_step,
    update_norm,
    value_noise_multiplier,
)
from bench.federated.partition import (
    client_batches,
    client_id_partition,
    dirichlet_partition,
    load_client_ids,
    sample_clients,
)
from bench.spec import AdaptiveClipping, OptimizerSpec


def _labels(n: int = 2_000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


# --------------------------------------------------------------------------- dirichlet partition


def test_dirichlet_partition_is_deterministic_and_depends_on_seed():
    y = _labels()
    a = dirichlet_partition(y, clients=40, alpha=0.5, seed=3)
    b = dirichlet_partition(y, clients=40, alpha=0.5, seed=3)
    c = dirichlet_partition(y, clients=40, alpha=0.5, seed=4)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("alpha", [0.01, 0.5, 100.0])
def test_dirichlet_partition_covers_every_example_once_in_balanced_sorted_clients(alpha):
    y = _labels(2_003)
    parts = dirichlet_partition(y, clients=40, alpha=alpha, seed=0)
    assert len(parts) == 40
    everything = np.concatenate(parts)
    assert np.array_equal(np.sort(everything), np.arange(len(y)))  # each index exactly once
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == len(y) and sizes.max() - sizes.min() <= 1
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


def test_dirichlet_partition_skews_labels_more_as_alpha_falls():
    y = _labels(4_000)

    def distinct_labels(alpha):
        return np.mean([len(np.unique(y[p])) for p in dirichlet_partition(y, clients=100, alpha=alpha, seed=1)])

    low, mid, high = distinct_labels(0.05), distinct_labels(1.0), distinct_labels(100.0)
    assert low < 3.5 < mid < high  # 40 examples per client: iid gives ~10 labels, alpha=0.05 one or two
    assert high > 9.5


def test_dirichlet_partition_keeps_non_contiguous_labels():
    y = np.repeat(np.array([3, 7, 42]), 50)
    parts = dirichlet_partition(y, clients=5, alpha=0.1, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(150))


def test_dirichlet_partition_rejects_more_clients_than_examples():
    with pytest.raises(ValueError, match=r"partition\.clients"):
        dirichlet_partition(_labels(10), clients=11, alpha=0.5, seed=0)
    with pytest.raises(ValueError, match="integer"):
        dirichlet_partition(np.zeros(10, np.float32), clients=2, alpha=0.5, seed=0)


def test_dirichlet_partition_is_fast_at_emnist_scale():
    y = _labels(60_000)
    t = time.perf_counter()
    parts = dirichlet_partition(y, clients=3_383, alpha=0.1, seed=0)
    assert time.perf_counter() - t < 2.0
    assert sum(len(p) for p in parts) == 60_000


# --------------------------------------------------------------------------- client ids


def test_client_id_partition_groups_indices_by_sorted_id():
    ids = np.array([5, 2, 5, 9, 2, 2])
    parts = client_id_partition(ids)
    assert [p.tolist() for p in parts] == [[1, 4, 5], [0, 2], [3]]
    assert all(p.dtype == np.int64 for p in parts)


def test_load_client_ids_reads_a_valid_file(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([1, 1, 0], np.int32))
    ids = load_client_ids(str(path), 3)
    assert ids.dtype == np.int64 and ids.tolist() == [1, 1, 0]


def test_load_client_ids_errors_name_the_file_and_what_was_expected(tmp_path):
    missing = tmp_path / "missing.npy"
    with pytest.raises(ValueError, match=r"missing\.npy.*does not exist.*3 client ids"):
        load_client_ids(missing, 3)
    wrong_length = tmp_path / "short.npy"
    np.save(wrong_length, np.arange(2))
    with pytest.raises(ValueError, match=r"short\.npy.*holds 2 ids.*3 client ids"):
        load_client_ids(wrong_length, 3)
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(3))
    with pytest.raises(ValueError, match=r"floats\.npy.*float64.*integer"):
        load_client_ids(floats, 3)
    matrix = tmp_path / "matrix.npy"
    np.save(matrix, np.zeros((3, 1), np.int64))
    with pytest.raises(ValueError, match=r"matrix\.npy.*\(3, 1\).*1-D"):
        load_client_ids(matrix, 3)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match=r"garbage\.npy.*could not be loaded"):
        load_client_ids(garbage, 3)


# --------------------------------------------------------------------------- client sampling


def test_sample_clients_is_deterministic_sorted_and_varies_by_round_and_seed():
    a = sample_clients(0, 5, 1_000, 0.1)
    assert np.array_equal(a, sample_clients(0, 5, 1_000, 0.1))
    assert not np.array_equal(a, sample_clients(0, 6, 1_000, 0.1))
    assert not np.array_equal(a, sample_clients(1, 5, 1_000, 0.1))
    assert a.dtype == np.int64 and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1_000


def test_sample_clients_has_the_poisson_rate():
    n, rate, rounds = 500, 0.04, 400
    counts = np.array([len(sample_clients(7, r, n, rate)) for r in range(rounds)])
    se = math.sqrt(n * rate * (1 - rate) / rounds)
    assert abs(counts.mean() - n * rate) < 5 * se
    assert counts.std() > 0  # not a fixed cohort size
    sizes = [len(sample_clients(0, r, 100, 0.001)) for r in range(50)]
    assert 0 in sizes and all(s <= 2 for s in sizes)  # tiny rate: empty rounds happen


# --------------------------------------------------------------------------- local batching plan


def test_client_batches_shapes_masks_padding_and_coverage():
    positions, mask = client_batches(10, epochs=3, batch_size=4, seed=0, round=2, client=9)
    assert positions.shape == mask.shape == (9, 4)
    assert positions.dtype == np.int64 and mask.dtype == np.float32
    for epoch in range(3):
        pos, m = positions[3 * epoch : 3 * epoch + 3], mask[3 * epoch : 3 * epoch + 3]
        assert np.array_equal(np.sort(pos[m == 1]), np.arange(10))  # every example once per epoch
        assert m[:2].all() and m[2].tolist() == [1, 1, 0, 0]  # only the epoch's last batch is padded
        assert pos[2, 2:].tolist() == [0, 0]
    assert not np.array_equal(positions[:3], positions[3:6])  # a fresh permutation each epoch
    again = client_batches(10, epochs=3, batch_size=4, seed=0, round=2, client=9)
    assert np.array_equal(positions, again[0])
    other = client_batches(10, epochs=3, batch_size=4, seed=0, round=2, client=8)
    assert not np.array_equal(positions, other[0])


def test_client_batches_exact_fit_and_empty_client():
    positions, mask = client_batches(8, epochs=1, batch_size=4, seed=0, round=0, client=0)
    assert positions.shape == (2, 4) and mask.all()
    positions, mask = client_batches(0, epochs=2, batch_size=4, seed=0, round=0, client=0)
    assert positions.shape == mask.shape == (0, 4)


# --------------------------------------------------------------------------- clipping


def _delta(rng, norm, shapes=((3, 4), (5,))):
    arrays = {f"w{i}": rng.normal(size=s) for i, s in enumerate(shapes)}
    scale = norm / math.sqrt(sum(float(np.sum(a * a)) for a in arrays.values()))
    return {k: (a * scale).astype(np.float32) for k, a in arrays.items()}


def test_update_norm_is_the_global_l2_norm():
    delta = {"a": np.array([3.0], np.float32), "b": np.array([[4.0, 12.0]], np.float32)}
    assert update_norm(delta) == 13.0


def test_clip_bounds_the_norm_and_leaves_small_deltas_untouched():
    rng = np.random.default_rng(0)
    for norm in [0.1, 0.9, 1.0, 1.5, 40.0]:
        d = _delta(rng, norm)
        clipped = clip(d, 1.0)
        assert update_norm(clipped) <= 1.0 + 1e-6
        if norm < 1.0:
            assert all(np.array_equal(clipped[k], d[k]) for k in d)
        else:
            assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
            assert all(np.allclose(clipped[k] * update_norm(d), d[k], rtol=1e-5) for k in d)  # same direction
    zero = {"a": np.zeros(3, np.float32)}
    assert np.array_equal(clip(zero, 1.0)["a"], zero["a"])


# --------------------------------------------------------------------------- noise multipliers


def test_value_noise_multiplier_formula_and_limits():
    # z = 1, count stddev 1: (1 - 1/4)^-1/2
    assert value_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    assert value_noise_multiplier(0.0, 1.0) == 0.0
    assert value_noise_multiplier(1.0, 1e9) == pytest.approx(1.0)  # a free count query costs nothing
    with pytest.raises(ValueError, match=r"adaptive_clipping\.count_stddev.*noise_multiplier"):
        value_noise_multiplier(1.0, 0.5)  # z == 2 * count stddev: nothing left for the values


def test_noise_params_defaults_like_tff():
    adaptive = AdaptiveClipping()
    assert noise_params(1.0, expected_clients=100, adaptive=adaptive) == (pytest.approx((1 - 0.01) ** -0.5), 5.0)
    own = AdaptiveClipping(count_stddev=2.0)
    assert noise_params(1.0, expected_clients=100, adaptive=own)[1] == 2.0
    assert noise_params(0.0, expected_clients=100, adaptive=own) == (0.0, 0.0)
    assert noise_params(0.7, expected_clients=100, adaptive=None) == (0.7, 0.0)
    with pytest.raises(ValueError, match=r"adaptive_clipping\.count_stddev"):
        noise_params(1.0, expected_clients=10, adaptive=adaptive)  # default count stddev 0.5


# --------------------------------------------------------------------------- aggregation


def _agg(deltas, clip_norm, *, z=0.0, expected=10.0, adaptive=None, dp=True, seed=0, like=None):
    like = like if like is not None else deltas[0]
    return aggregate(
        deltas,
        AggregatorState(clip_norm=clip_norm),
        dp=dp,
        noise_multiplier=z,
        expected_clients=expected,
        adaptive=adaptive,
        rng=np.random.default_rng(seed),
        like=like,
    )


def test_noiseless_aggregate_is_the_sum_of_clipped_deltas_over_expected_clients():
    rng = np.random.default_rng(1)
    deltas = [_delta(rng, n) for n in [0.2, 0.7, 3.0, 10.0]]
    update, _, stats = _agg(deltas, 1.0, z=0.0, expected=8.0, adaptive=AdaptiveClipping())
    for k in deltas[0]:
        want = sum(clip(d, 1.0)[k].astype(np.float64) for d in deltas) / 8.0  # by expected, not by 4 sampled
        np.testing.assert_allclose(update[k], want, rtol=1e-6, atol=1e-7)
        assert update[k].dtype == np.float32
    assert stats.sampled == 4 and stats.clip_norm == 1.0
    assert stats.unclipped_fraction == 0.5
    assert stats.mean_norm == pytest.approx(np.mean([0.2, 0.7, 3.0, 10.0]), rel=1e-6)


@pytest.mark.parametrize("adaptive", [None, AdaptiveClipping()])
def test_aggregate_noise_has_value_noise_multiplier_times_this_rounds_clip(adaptive):
    rng = np.random.default_rng(2)
    shapes = ((300, 300), (50_000,))
    deltas = [_delta(rng, n, shapes) for n in [0.5, 2.0, 5.0]]
    z, expected, c = 0.8, 20.0, 1.5
    noiseless, _, _ = _agg(deltas, c, z=0.0, expected=expected, adaptive=adaptive)
    noisy, state, _ = _agg(deltas, c, z=z, expected=expected, adaptive=adaptive, seed=11)
    residual = np.concatenate([(noisy[k].astype(np.float64) - noiseless[k]).ravel() for k in noisy]) * expected
    vnm = value_noise_multiplier(z, expected / 20) if adaptive else z
    assert vnm > z if adaptive else vnm == z
    assert abs(residual.mean()) < 5 * vnm * c / math.sqrt(residual.size)
    assert residual.std() == pytest.approx(vnm * c, rel=0.02)  # the clip used is C before this round's update
    if adaptive is None:
        assert state.clip_norm == c


def test_aggregate_is_deterministic_in_the_rng():
    rng = np.random.default_rng(3)
    deltas = [_delta(rng, 2.0) for _ in range(3)]
    a, sa, _ = _agg(deltas, 1.0, z=0.5, adaptive=AdaptiveClipping(count_stddev=1.0), seed=5)
    b, sb, _ = _agg(deltas, 1.0, z=0.5, adaptive=AdaptiveClipping(count_stddev=1.0), seed=5)
    c, _, _ = _agg(deltas, 1.0, z=0.5, adaptive=AdaptiveClipping(count_stddev=1.0), seed=6)
    assert all(np.array_equal(a[k], b[k]) for k in a) and sa == sb
    assert not np.array_equal(a["w0"], c["w0"])


def test_adaptive_clip_follows_the_geometric_update_rule():
    rng = np.random.default_rng(4)
    deltas = [_delta(rng, n) for n in [0.5, 0.8, 2.0, 3.0, 4.0]]  # 2 of 5 unclipped at C = 1
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)
    _, state, stats = _agg(deltas, 1.0, z=0.0, expected=5.0, adaptive=adaptive)
    assert stats.unclipped_fraction == pytest.approx(0.4)
    assert state.clip_norm == pytest.approx(math.exp(-0.2 * (0.4 - 0.5)))
    # the noiseless fraction uses the expected count, not the sampled one, and is clamped to [0, 1]
    _, state, _ = _agg(deltas[:2], 1.0, z=0.0, expected=1.0, adaptive=adaptive)
    assert state.clip_norm == pytest.approx(math.exp(-0.2 * (1.0 - 0.5)))


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_adaptive_clip_converges_to_the_target_quantile(target):
    mu, sigma, clients = 0.0, 0.5, 100
    rng = np.random.default_rng(5)
    state = AggregatorState(clip_norm=0.1)
    adaptive = AdaptiveClipping(target_quantile=target)
    like = {"w": np.zeros(1, np.float32)}
    clips = []
    for r in range(300):
        norms = rng.lognormal(mu, sigma, clients)
        deltas = [{"w": np.array([n], np.float32)} for n in norms]
        _, state, _ = aggregate(
            deltas,
            state,
            dp=True,
            noise_multiplier=0.5,  # count stddev 5 (clients / 20): a noised count, as in a private run
            expected_clients=clients,
            adaptive=adaptive,
            rng=np.random.default_rng([0, r]),
            like=like,
        )
        clips.append(state.clip_norm)
    true_quantile = math.exp(mu + sigma * {0.5: 0.0, 0.8: 0.8416212335729143}[target])
    assert clips[0] < 0.12  # it started far away
    assert clips[-1] == pytest.approx(true_quantile, rel=0.1)
    assert np.mean(clips[-50:]) == pytest.approx(true_quantile, rel=0.05)


def test_empty_round_returns_noise_only_and_moves_the_clip_from_the_count_noise():
    like = {"a": np.zeros((4, 5), np.float32), "b": np.zeros(3, np.float32)}
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)
    update, state, stats = _agg([], 2.0, z=0.0, expected=10.0, adaptive=adaptive, like=like)
    assert {k: v.shape for k, v in update.items()} == {"a": (4, 5), "b": (3,)}
    assert all(not v.any() and v.dtype == np.float32 for v in update.values())
    assert state.clip_norm == 2.0  # noiseless empty count: fraction 0.5 = target, no move
    assert stats.sampled == 0 and math.isnan(stats.unclipped_fraction) and math.isnan(stats.mean_norm)
    # with noise: the update is pure value noise, the clip moves by exactly the count noise
    seed, z, expected = 9, 0.5, 10.0
    update, state, _ = _agg([], 2.0, z=z, expected=expected, adaptive=adaptive, like=like, seed=seed)
    vnm, count_sd = noise_params(z, expected_clients=expected, adaptive=adaptive)
    rng = np.random.default_rng(seed)
    want = {k: rng.normal(0.0, vnm * 2.0, v.shape) for k, v in like.items()}
    count = rng.normal(0.0, count_sd)
    for k in like:
        np.testing.assert_allclose(update[k], want[k] / expected, rtol=1e-6)
    below = min(1.0, max(0.0, count / expected + 0.5))
    assert state.clip_norm == pytest.approx(2.0 * math.exp(-0.2 * (below - 0.5)))
    assert state.clip_norm != 2.0


def test_fixed_clipping_keeps_the_clip():
    rng = np.random.default_rng(6)
    deltas = [_delta(rng, n) for n in [0.1, 5.0]]
    update, state, stats = _agg(deltas, 1.0, z=0.3, adaptive=None)
    assert state.clip_norm == 1.0 and stats.clip_norm == 1.0 and stats.unclipped_fraction == 0.5


def test_non_private_aggregate_is_the_plain_sum_over_expected_clients():
    rng = np.random.default_rng(7)
    deltas = [_delta(rng, n) for n in [0.1, 5.0, 30.0]]
    update, state, _ = _agg(deltas, 1.0, z=1.0, dp=False, expected=4.0, adaptive=AdaptiveClipping())
    for k in deltas[0]:
        want = sum(d[k].astype(np.float64) for d in deltas) / 4.0  # unclipped, noiseless
        np.testing.assert_allclose(update[k], want, rtol=1e-6)
    assert state.clip_norm == 1.0


def test_aggregate_rejects_mismatched_deltas():
    with pytest.raises(ValueError, match="arrays"):
        _agg([{"a": np.zeros(2, np.float32)}], 1.0, like={"b": np.zeros(2, np.float32)})


# --------------------------------------------------------------------------- server optimizer


def _params():
    return {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([0.25], np.float32)}


def test_server_sgd_lr_one_no_momentum_adds_the_update_exactly():
    params = _params()
    update = {"w": np.array([0.1, 0.2, -0.3], np.float32), "b": np.array([1e-3], np.float32)}
    opt = OptimizerSpec(name="sgd", learning_rate=1.0, momentum=0.0)
    new, state = server_step(params, update, init_server_state(params, opt), opt)
    for k in params:
        assert np.array_equal(new[k], params[k] + update[k])
        assert new[k].dtype == np.float32
    assert state.step == 1


def test_server_sgd_momentum_and_weight_decay_match_a_hand_computation():
    lr, mu, wd = 0.5, 0.9, 0.1
    opt = OptimizerSpec(name="sgd", learning_rate=lr, momentum=mu, weight_decay=wd)
    updates = [np.array([1.0, -1.0]), np.array([0.5, 0.0]), np.array([-2.0, 3.0])]
    params, state = {"w": np.array([1.0, 2.0], np.float32)}, init_server_state({"w": np.zeros(2)}, opt)
    p, buf = np.array([1.0, 2.0]), None
    for u in updates:
        params, state = server_step(params, {"w": u.astype(np.float32)}, state, opt)
        g = -u + wd * p  # pseudo-gradient with coupled weight decay
        buf = g if buf is None else mu * buf + g  # torch: the first step's buffer is g itself
        p = p - lr * buf
        np.testing.assert_allclose(params["w"], p, rtol=1e-6)
    assert state.step == 3
    # hand-expanded first step: p1 = p0 - lr * (-u0 + wd * p0)
    first, _ = server_step({"w": np.array([1.0, 2.0], np.float32)}, {"w": updates[0]}, ServerState(), opt)
    np.testing.assert_allclose(first["w"], [1.0 - 0.5 * (-1.0 + 0.1), 2.0 - 0.5 * (1.0 + 0.2)], rtol=1e-6)


def test_server_adam_matches_a_reference():
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-6, 0.05
    opt = OptimizerSpec(name="adam", learning_rate=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
    rng = np.random.default_rng(8)
    params = {"w": rng.normal(size=5).astype(np.float32)}
    state = init_server_state(params, opt)
    p, m, v = params["w"].astype(np.float64), np.zeros(5), np.zeros(5)
    for t in range(1, 5):
        u = rng.normal(size=5)
        params, state = server_step(params, {"w": u.astype(np.float32)}, state, opt)
        g = -u.astype(np.float32).astype(np.float64) + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        np.testing.assert_allclose(params["w"], p, rtol=1e-5, atol=1e-7)
    assert state.step == 4
    # the very first Adam step moves each coordinate by about lr in the update's direction
    first, _ = server_step(
        {"w": np.zeros(2, np.float32)},
        {"w": np.array([3.0, -0.2], np.float32)},
        ServerState(exp_avg={"w": np.zeros(2, np.float32)}, exp_avg_sq={"w": np.zeros(2, np.float32)}),
        OptimizerSpec(name="adam", learning_rate=0.1, eps=1e-12),
    )
    np.testing.assert_allclose(first["w"], [0.1, -0.1], rtol=1e-5)
