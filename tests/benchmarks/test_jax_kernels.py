"""The XLA measurements behind the choices in backends/jax (bk.py, backend.py), side by side.

Each group times two ways of computing the same thing; `make bench` writes them to results/_benchmarks/jax.json
and `pytest-benchmark compare` (or the terminal table) shows the ratio. Runs in the JAX environment only.
"""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
lax = jax.lax

from backends.jax import bk  # noqa: E402
from backends.jax import models as zoo  # noqa: E402
from bench.models import Conv, MaxPool  # noqa: E402


def _timed(benchmark, fn, *args):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    return benchmark.pedantic(lambda: jax.block_until_ready(fn(*args)), rounds=5, warmup_rounds=1)


def _normal(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ResNet-18's third stage on 32x32 inputs: a 3x3 convolution on a 2x2 input, batch 320.
SMALL = Conv("c", 256, 3, padding=1, bias=False)
SMALL_X = (320, 2, 2, 256)


@pytest.mark.benchmark(group="conv-small-output-forward")
@pytest.mark.parametrize("form", ["xla", "patches"])
def test_small_output_conv(benchmark, form):
    conv = zoo.conv if form == "xla" else bk.conv
    p = {"c/kernel": _normal((3, 3, 256, 256))}
    out = _timed(benchmark, lambda p, x: conv(p, SMALL, x), p, _normal(SMALL_X))
    assert out.shape == SMALL_X


# The Fashion-MNIST CNN's second convolution at batch 2232: its filter gradient outside and inside a loop body.
CONV2 = Conv("c", 32, 4, stride=2)


def _filter_grad(x, g, k):
    _, vjp = jax.vjp(lambda k: zoo.conv({"c/kernel": k, "c/bias": jnp.zeros(32)}, CONV2, x), k)
    return vjp(g)[0]


@pytest.mark.benchmark(group="filter-gradient-in-scan")
@pytest.mark.parametrize("where", ["plain", "scan"])
def test_filter_gradient_in_scan(benchmark, where):
    x, g, k = _normal((2232, 13, 13, 16)), _normal((2232, 5, 5, 32), 1), _normal((4, 4, 16, 32), 2)
    if where == "plain":
        fn = _filter_grad
    else:

        def fn(x, g, k):
            return lax.scan(lambda c, xg: (c, _filter_grad(xg[0], xg[1], k)), 0.0, (x[None], g[None]))[1][0]

    assert _timed(benchmark, fn, x, g, k).shape == k.shape


@pytest.mark.benchmark(group="max-pool-gradient")
@pytest.mark.parametrize("form", ["reduce_window", "slices"])
def test_max_pool_gradient(benchmark, form):
    layer = MaxPool(2, 1)
    pool = (lambda x: zoo.layer_apply({}, layer, x)) if form == "reduce_window" else (lambda x: bk.max_pool(layer, x))
    x = _normal((2232, 14, 14, 16))
    assert _timed(benchmark, jax.grad(lambda x: jnp.sum(pool(x) ** 2)), x).shape == x.shape


@pytest.mark.benchmark(group="noise-11M")
@pytest.mark.parametrize("partitionable", [False, True])
def test_threefry_noise(benchmark, partitionable):
    before = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", partitionable)
    try:
        out = _timed(benchmark, lambda k: jax.random.normal(k, (11_200_000,)), jax.random.key(0))
    finally:
        jax.config.update("jax_threefry_partitionable", before)
    assert out.shape == (11_200_000,)


# The Fashion-MNIST CNN's first convolution (one input channel) forward, and its second one's input gradient,
# at batch 2232: XLA's strided forms against a stride-1 convolution on a space-to-depth input (bk.conv).
CONV1 = Conv("c", 16, 8, stride=2, padding=3, bias=False)


@pytest.mark.benchmark(group="conv-strided-forward")
@pytest.mark.parametrize("form", ["xla", "space-to-depth"])
def test_strided_conv_forward(benchmark, form):
    conv = zoo.conv if form == "xla" else bk.conv
    p = {"c/kernel": _normal((8, 8, 1, 16))}
    assert _timed(benchmark, lambda p, x: conv(p, CONV1, x), p, _normal((2232, 28, 28, 1))).shape == (2232, 14, 14, 16)


@pytest.mark.benchmark(group="conv-strided-input-gradient")
@pytest.mark.parametrize("form", ["xla", "space-to-depth"])
def test_strided_conv_input_gradient(benchmark, form):
    conv = zoo.conv if form == "xla" else bk.conv
    p = {"c/kernel": _normal((4, 4, 16, 32)), "c/bias": jnp.zeros(32)}
    x, g = _normal((2232, 13, 13, 16)), _normal((2232, 5, 5, 32), 1)

    def input_grad(p, x, g):
        return jax.vjp(lambda x: conv(p, CONV2, x), x)[1](g)[0]

    assert _timed(benchmark, input_grad, p, x, g).shape == x.shape


# The CNN's DP (book-keeping) clipped sum at physical batch 2224 in one piece and in concurrent slices: 16 of 139
# rows, and backend.slice_count's 28 of 79-80.
@pytest.mark.benchmark(group="batch-slices")
@pytest.mark.parametrize("parts", [1, 16, 28])
def test_batch_slices(benchmark, parts):
    from backends.jax import backend as jb
    from bench.models import build_spec, init_params

    spec = build_spec("cnn-tanh", (28, 28, 1), 10)
    params = {k: jnp.asarray(v) for k, v in init_params(spec, 0).items()}
    chunk_sum = bk.make_clipped_sum(spec, jb.cross_entropy, lambda n, m: jb.clip_factors(n, 0.1, m))
    x, y = _normal((2224, 28, 28, 1)), jnp.zeros(2224, jnp.int32)
    g, _, _ = _timed(benchmark, jb.split_sum(chunk_sum, parts), params, x, y, jnp.ones(2224))
    assert g.keys() == params.keys()


# The CNN's per-example work in the DP step at physical batch 2224, in backend.slice_count's slices (28): each
# example's kernel gradients, their squared norms and their weighted sum (the norms standing in for the weights).
def _sliced(fn):
    from backends.jax.backend import slice_bounds, slice_count

    def run(x, g):
        return sum(fn(x[lo:hi], g[lo:hi]) for lo, hi in slice_bounds(len(x), slice_count(len(x))))

    return run


def _kept_sum(per_example):
    """Per-example arrays -> their norm-weighted sum (the kept path's work after forming them)."""
    norms = sum(jnp.sum(p.reshape(p.shape[0], -1) ** 2, 1) for p in per_example)
    return [jnp.tensordot(norms, p, axes=1) for p in per_example]


def _blocks_one_copy_per_offset(x, g):
    """`bk._channel_first_blocks` with its patches stacked from one strided view per kernel offset."""
    x = bk._space_to_depth(bk._pad(x, CONV1.padding), 2).transpose(0, 3, 1, 2)
    views = [x[:, :, i : i + 14, j : j + 14] for i in range(4) for j in range(4)]
    patches = jnp.stack(views, 1).reshape(x.shape[0], 64, 196)
    return jnp.einsum("bkt,bto->bko", patches, g.reshape(-1, 196, 16)).reshape(-1, 16, 4, 16)


@pytest.mark.benchmark(group="conv1-per-example")
@pytest.mark.parametrize(
    "form", ["offset-blocks", "channel-patches", "channel-first-blocks-one-copy-per-offset", "channel-first-blocks"]
)
def test_first_conv_per_example(benchmark, form):
    def kept(x, g):
        if form == "channel-patches":
            return _kept_sum([bk.conv_per_example(CONV1, x, g)])[0]
        blocks = {
            "offset-blocks": lambda: jnp.stack(bk._offset_blocks(CONV1, x, g), 1),
            "channel-first-blocks-one-copy-per-offset": lambda: _blocks_one_copy_per_offset(x, g),
            "channel-first-blocks": lambda: bk._channel_first_blocks(CONV1, x, g),
        }[form]()
        return bk._unblock(CONV1, _kept_sum([blocks])[0], 1)

    x, g = _normal((2224, 28, 28, 1)), _normal((2224, 14, 14, 16), 1)
    assert _timed(benchmark, _sliced(kept), x, g).shape == (8, 8, 1, 16)


# ResNet-18's first convolution (7x7, stride 2, 3 channels: its kernel is not a multiple of its stride, so its
# per-example gradients are kept as `conv_per_example` gives them) at physical batch 320 in 4 slices.
RESNET_CONV1 = Conv("c", 64, 7, stride=2, padding=3, bias=False)


@pytest.mark.benchmark(group="resnet-conv1-per-example")
@pytest.mark.parametrize("form", ["offset-blocks", "channel-patches"])
def test_resnet_first_conv_per_example(benchmark, form):
    def kept(x, g):
        if form == "channel-patches":
            return _kept_sum([bk.conv_per_example(RESNET_CONV1, x, g)])[0]
        return _kept_sum([bk._unblock(RESNET_CONV1, jnp.stack(bk._offset_blocks(RESNET_CONV1, x, g), 1), 3)])[0]

    x, g = _normal((320, 32, 32, 3)), _normal((320, 16, 16, 64), 1)
    assert _timed(benchmark, _sliced(kept), x, g).shape == (7, 7, 3, 64)


@pytest.mark.benchmark(group="conv2-clipped-sum")
@pytest.mark.parametrize("form", ["weighted-filter-gradient", "kept-blocks-stacked", "kept-blocks"])
def test_second_conv_clipped_sum(benchmark, form):
    """kept-blocks: each kernel offset's per-example block kept apart, as `bk.kept_grads` does; -stacked: the
    blocks stacked into one (N, offsets^2, s*s*C, O) array first."""
    k = _normal((4, 4, 16, 32), 3)
    layer = Conv("c", 32, 4, stride=2, bias=False)

    def clipped(x, g):
        if form == "kept-blocks-stacked":
            return bk._unblock(layer, _kept_sum([jnp.stack(bk._offset_blocks(layer, x, g), 1)])[0], 16)
        if form == "kept-blocks":
            return bk._unblock(layer, jnp.stack(_kept_sum(bk._offset_blocks(layer, x, g))), 16)
        norms = bk.conv_sq_norms(layer, x, g)
        return bk.filter_grad(layer, x, g * norms[:, None, None, None], k)

    x, g = _normal((2224, 13, 13, 16)), _normal((2224, 5, 5, 32), 1)
    assert _timed(benchmark, _sliced(clipped), x, g).shape == k.shape


# Why `bk.conv_per_example` forms patches only for few input channels: ResNet-18's second stage's first
# convolution (3x3, stride 2, 64 -> 128 channels, 16x16 -> 8x8) at physical batch 320 in 4 slices, squared norms of
# each example's kernel gradient.
@pytest.mark.benchmark(group="many-channels-norms")
@pytest.mark.parametrize("form", ["offset-blocks", "channel-patches"])
def test_many_channels_norms(benchmark, form):
    layer = Conv("c", 128, 3, stride=2, padding=1, bias=False)

    def norms(x, g):
        if form == "offset-blocks":
            return jnp.sum(bk.conv_sq_norms(layer, x, g))
        patches = bk._channel_first_patches(bk._channel_first(x, layer.padding), 3, 2, 8, 8)
        return jnp.sum(jnp.einsum("bkt,bto->bko", patches, g.reshape(-1, 64, 128)) ** 2)

    x, g = _normal((320, 16, 16, 64)), _normal((320, 8, 8, 128), 1)
    assert _timed(benchmark, _sliced(norms), x, g).shape == ()
