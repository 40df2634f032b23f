"""Checks of the JAX backend's internal forms, run inside the JAX environment by test_jax_forms.py.

`python -m tests.conformance.jax_checks NAME` runs one check and exits 0 when it holds. Each compares a fast
form with the plain one it replaces, so a wrong space-to-depth kernel or a lost slice of the batch shows here,
not only as a small drift in the conformance cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp

from backends.jax import CPU_SCHEDULER_FLAG, bk
from backends.jax import backend as jb
from backends.jax import models as zoo
from bench.models import Conv, build_spec, init_params

# (kernel, stride, padding, input channels, output channels, input size): the zoo's strided and plain
# convolutions, a 1x1 stride-2 shortcut, and a kernel that is not a multiple of its stride of 3.
CONVS = [
    (8, 2, 3, 1, 16, 28),
    (4, 2, 0, 16, 32, 13),
    (7, 2, 3, 3, 64, 32),
    (3, 2, 1, 16, 32, 16),
    (1, 2, 0, 16, 32, 16),
    (3, 1, 1, 8, 8, 10),
    (5, 3, 1, 2, 4, 17),
]


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(name: str, got: jax.Array, want: jax.Array, rtol: float = 2e-5) -> None:
    err = float(jnp.linalg.norm(got - want) / (jnp.linalg.norm(want) + 1e-30))
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert err < rtol, f"{name}: relative error {err:.2e} >= {rtol:.0e}"


def _conv_form(seed: int, k: int, s: int, pad: int, c: int, o: int, h: int) -> None:
    layer = Conv("c", o, k, stride=s, padding=pad)
    p = {"c/kernel": _normal(seed, (k, k, c, o)), "c/bias": _normal(seed + 100, (o,))}
    x = _normal(seed + 200, (6, h, h, c))

    def loss(conv, p, x):
        y = conv(p, layer, x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))

    tag = f"kernel {k} stride {s} padding {pad} channels {c}"
    _close(f"{tag}: forward", jax.jit(lambda p, x: bk.conv(p, layer, x))(p, x), zoo.conv(p, layer, x))
    got = jax.jit(jax.grad(lambda p, x: loss(bk.conv, p, x), argnums=(0, 1)))(p, x)
    want = jax.grad(lambda p, x: loss(zoo.conv, p, x), argnums=(0, 1))(p, x)
    _close(f"{tag}: kernel gradient", got[0]["c/kernel"], want[0]["c/kernel"])
    _close(f"{tag}: bias gradient", got[0]["c/bias"], want[0]["c/bias"])
    _close(f"{tag}: input gradient", got[1], want[1])


def check_conv_forms() -> None:
    """bk.conv (space-to-depth forward and input gradient, XLA's filter gradient) equals XLA's convolution."""
    for seed, conv in enumerate(CONVS):
        _conv_form(seed, *conv)


def _per_example_case(seed: int, k: int, s: int, pad: int, c: int, o: int, h: int) -> None:
    layer = Conv("c", o, k, stride=s, padding=pad, bias=False)
    kernel, x = _normal(seed, (k, k, c, o)), _normal(seed + 200, (5, h, h, c))
    g = _normal(seed + 300, jax.eval_shape(lambda x: zoo.conv_kernel(layer, kernel, x), x).shape)
    want = jax.vmap(lambda x, g: bk.filter_grad(layer, x[None], g[None], kernel))(x, g)
    _close(f"kernel {k} stride {s} channels {c}", jax.jit(partial(bk.conv_per_example, layer))(x, g), want)
    if k % s == 0:
        blocks = jax.jit(partial(bk._channel_first_blocks, layer))(x, g)
        _close(f"kernel {k} stride {s} channels {c}, channel-first blocks", bk._unblock(layer, blocks, c), want)


def check_per_example() -> None:
    """bk.conv_per_example (channel-first patches for few channels, kernel-offset blocks for more), and the
    channel-first blocks of a kernel that is a multiple of its stride, equal each example's XLA filter gradient."""
    for seed, conv in enumerate(CONVS):
        _per_example_case(seed, *conv)


def _clipped_sum_case(model: str, shape: tuple[int, int, int], max_norm: float) -> None:
    spec = build_spec(model, shape, 10)
    params = {k: jnp.asarray(v) for k, v in init_params(spec, 0).items()}
    x, y = _normal(2, (5, *shape)), jnp.arange(5, dtype=jnp.int32)
    mask = jnp.asarray([1.0] * 4 + [0.0])
    apply = zoo.make_apply(spec)

    def loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return jb.cross_entropy(apply(p, x[None]), y[None])[0]

    def clip(norms: jax.Array, mask: jax.Array) -> jax.Array:
        return jb.clip_factors(norms, max_norm, mask)

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    weights = clip(jb.global_norms(per_example), mask)
    want = {k: jnp.tensordot(weights, v, axes=1) for k, v in per_example.items()}
    default = bk.KEPT_BYTES
    for kept_bytes in (0, 10**12):
        bk.KEPT_BYTES = kept_bytes
        try:
            got, _, _ = jax.jit(bk.make_clipped_sum(spec, jb.cross_entropy, clip))(params, x, y, mask)
        finally:
            bk.KEPT_BYTES = default
        for k in params:
            _close(f"{model}, KEPT_BYTES {kept_bytes}: {k}", got[k], want[k], rtol=1e-4)


def check_clipped_sum() -> None:
    """The book-keeping clipped sum equals clipping vmap's per-example gradients, with per-example kernel
    gradients kept for every convolution that allows it and for only those with few input channels
    (bk.KEPT_BYTES)."""
    _clipped_sum_case("cnn-tanh", (28, 28, 1), 0.5)
    _clipped_sum_case("resnet18-gn", (32, 32, 3), 5.0)


def check_split_sum() -> None:
    """Summing over 2, 3 or 5 slices of a batch (5: of 2 or 3 rows) gives the one-slice sums, DP (bk) and
    non-private; more slices than rows is an error."""
    spec = build_spec("cnn-tanh", (28, 28, 1), 10)
    params = {k: jnp.asarray(v) for k, v in init_params(spec, 0).items()}
    x, y = _normal(1, (12, 28, 28, 1)), jnp.arange(12, dtype=jnp.int32) % 10
    mask = jnp.asarray([1.0] * 9 + [0.0] * 3)
    sums = {
        "bk": bk.make_clipped_sum(spec, jb.cross_entropy, lambda n, m: jb.clip_factors(n, 0.5, m)),
        "non-private": jb.make_masked_sum(bk.make_apply(spec)),
    }
    for name, chunk_sum in sums.items():
        g1, loss1, correct1 = jax.jit(chunk_sum)(params, x, y, mask)
        for parts in (2, 3, 5):
            g, loss, correct = jax.jit(jb.split_sum(chunk_sum, parts))(params, x, y, mask)
            for k in params:
                _close(f"{name}, {parts} slices: {k}", g[k], g1[k], rtol=1e-5)
            _close(f"{name}, {parts} slices: loss", loss, loss1, rtol=1e-5)
            assert float(correct) == float(correct1), f"{name}, {parts} slices: correct {correct} != {correct1}"
        try:
            jb.split_sum(chunk_sum, 13)(params, x, y, mask)
        except ValueError as e:
            assert "13 slices of a batch of 12 rows" in str(e), e
        else:
            raise AssertionError("split_sum: 13 slices of 12 rows did not raise")


def check_slice_count() -> None:
    """The fewest slices of at most SLICE_ROWS (80) rows, at most MAX_SLICES (32)."""
    want = {2224: 28, 2232: 28, 2053: 26, 320: 4, 256: 4, 81: 2, 80: 1, 8: 1, 1: 1, 4000: 32}
    got = {physical: jb.slice_count(physical) for physical in want}
    assert got == want, f"slice_count: {got} != {want}"


def check_xla_flags() -> None:
    """Importing the package sets the CPU scheduler flag, leaves a flag the user set alone, and XLA takes it."""
    assert CPU_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", ""), os.environ.get("XLA_FLAGS")
    jax.devices()  # XLA aborts the process on a flag it does not know
    name = CPU_SCHEDULER_FLAG.split("=")[0]
    code = "import os, backends.jax; print(os.environ['XLA_FLAGS'])"
    env = {**os.environ, "XLA_FLAGS": f"{name}=true"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{name}=true", out.stdout


CHECKS = {
    "conv_forms": check_conv_forms,
    "per_example": check_per_example,
    "clipped_sum": check_clipped_sum,
    "split_sum": check_split_sum,
    "slice_count": check_slice_count,
    "xla_flags": check_xla_flags,
}

if __name__ == "__main__":
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]}: ok")
