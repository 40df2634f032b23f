"""Checks of the JAX backend's internal forms, run inside the JAX environment by test_jax_forms.py.

`python -m tests.conformance.jax_checks NAME` runs one check and exits 0 when it holds. Each compares a fast
form with the plain one it replaces, so a wrong space-to-depth kernel or a lost slice of the batch shows here,
not only as a small drift in the conformance cases.
"""

from __future__ import annotations

import os
import subprocess
import sys

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


def check_split_sum() -> None:
    """Summing over 2, 3 or 4 slices of a batch gives the one-slice sums, DP (bk) and non-private."""
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
        for parts in (2, 3, 4):
            g, loss, correct = jax.jit(jb.split_sum(chunk_sum, parts))(params, x, y, mask)
            for k in params:
                _close(f"{name}, {parts} slices: {k}", g[k], g1[k], rtol=1e-5)
            _close(f"{name}, {parts} slices: loss", loss, loss1, rtol=1e-5)
            assert float(correct) == float(correct1), f"{name}, {parts} slices: correct {correct} != {correct1}"


def check_slice_count() -> None:
    """Slices of at most SLICE_ROWS rows where a divisor allows; else the most that divide the batch."""
    want = {2232: 18, 2224: 16, 320: 4, 256: 2, 129: 3, 128: 1, 8: 1, 2053: 1}
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
    "split_sum": check_split_sum,
    "slice_count": check_slice_count,
    "xla_flags": check_xla_flags,
}

if __name__ == "__main__":
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]}: ok")
