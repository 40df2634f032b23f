"""The zoo in JAX: a pure `apply(params, x)` from the framework-neutral spec."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from bench.models import Act, Conv, Dense, Flatten, GlobalAvgPool, GroupNorm, Layer, MaxPool, ModelSpec, Residual

Params = dict[str, jax.Array]

GN_EPS = 1e-5


def conv_kernel(layer: Conv, kernel: jax.Array, x: jax.Array) -> jax.Array:
    """The convolution without its bias."""
    pad = [(layer.padding, layer.padding)] * 2
    return lax.conv_general_dilated(
        x, kernel, (layer.stride, layer.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv(p: Params, layer: Conv, x: jax.Array) -> jax.Array:
    y = conv_kernel(layer, p[f"{layer.name}/kernel"], x)
    return y + p[f"{layer.name}/bias"] if layer.bias else y


def normalize(layer: GroupNorm, x: jax.Array) -> jax.Array:
    """GroupNorm without its affine part."""
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, layer.groups, c // layer.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) * lax.rsqrt(var + GN_EPS)).reshape(n, h, w, c)


def _group_norm(p: Params, layer: GroupNorm, x: jax.Array) -> jax.Array:
    return normalize(layer, x) * p[f"{layer.name}/scale"] + p[f"{layer.name}/bias"]


def _max_pool(layer: MaxPool, x: jax.Array) -> jax.Array:
    pad = ((0, 0), (layer.padding, layer.padding), (layer.padding, layer.padding), (0, 0))
    window = (1, layer.size, layer.size, 1)
    return lax.reduce_window(x, -jnp.inf, lax.max, window, (1, layer.stride, layer.stride, 1), pad)


def layer_apply(p: Params, layer: Layer, x: jax.Array) -> jax.Array:
    if isinstance(layer, Conv):
        return conv(p, layer, x)
    if isinstance(layer, Dense):
        return x @ p[f"{layer.name}/kernel"] + p[f"{layer.name}/bias"]
    if isinstance(layer, Act):
        return jax.nn.relu(x) if layer.kind == "relu" else jnp.tanh(x)
    if isinstance(layer, MaxPool):
        return _max_pool(layer, x)
    if isinstance(layer, GroupNorm):
        return _group_norm(p, layer, x)
    if isinstance(layer, Flatten):
        return x.reshape(x.shape[0], -1)
    if isinstance(layer, GlobalAvgPool):
        return x.mean(axis=(1, 2))
    if isinstance(layer, Residual):
        return jax.nn.relu(_sequence(p, layer.body, x) + _sequence(p, layer.shortcut, x))
    raise TypeError(f"unsupported layer {layer!r}")


def _sequence(p: Params, layers: tuple[Layer, ...], x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer_apply(p, layer, x)
    return x


def make_apply(spec: ModelSpec) -> Callable[[Params, jax.Array], jax.Array]:
    """logits = apply(params, x) for a batch x in NHWC."""

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return _sequence(params, spec.layers, x)

    return apply
