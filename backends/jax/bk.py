"""Book-keeping DP-SGD (Bu et al. 2023, "Differentially Private Optimization on Large Model at Small Cost").

One forward pass records every trainable layer's input; one backward pass, taken to zero "taps" added to the
layer outputs, gives each layer's output gradients. From those two, per example and per layer, come the gradient
norms (as a ghost norm, Li et al. 2022, or from the per-example layer gradient, whichever costs less) and then
the clipped sum: each layer's filter gradient of its clip-weighted output gradients, or, for a first convolution
whose per-example gradients are small and already formed, their weighted sum. There is no per-example gradient
of the whole model and no second backward pass, so DP costs little more than non-private training.

The model is the zoo's, computed in the forms XLA runs fast (measured on 2 CPU cores by
`tests/benchmarks/test_jax_kernels.py`): max pooling is the maximum of shifted slices, since XLA's CPU back end
runs the gradient of `reduce_window` (a select-and-scatter) 20x slower (214 ms against 9 ms for the CNN's first
pool at batch 2232); a convolution with at most SMALL_OUTPUT output positions (ResNet-18's last stages on 32x32
inputs) is one matmul on patches, since XLA's CPU convolution is 26x slower there (3x3 on a 2x2 input at batch
320: 261 ms against 10 ms). The layer walk mirrors `models.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, reduce

import jax
import jax.numpy as jnp

from backends.jax import models
from backends.jax.models import Params, layer_apply, normalize
from bench.models import Conv, Dense, GroupNorm, Layer, MaxPool, ModelSpec, Residual

Acts = dict[str, jax.Array]


def _pad(x: jax.Array, padding: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else x


def _windows(x: jax.Array, kernel: int, stride: int, ho: int, wo: int) -> list[jax.Array]:
    """The kernel*kernel strided views of a padded input, one per kernel offset, each (N, ho, wo, C)."""
    return [
        x[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(kernel)
        for j in range(kernel)
    ]


def _patches(layer: Conv, x: jax.Array, ho: int, wo: int) -> jax.Array:
    """(N, ho, wo, k*k*C): each output position's input window, in the HWIO kernel's (i, j, c) order."""
    return jnp.concatenate(_windows(_pad(x, layer.padding), layer.kernel, layer.stride, ho, wo), axis=-1)


def _space_to_depth(x: jax.Array, s: int) -> jax.Array:
    """(N, H, W, C) -> (N, H/s, W/s, s*s*C), zero-padding H and W up to multiples of s."""
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % s), (0, -w % s), (0, 0)))
    h, w = x.shape[1] // s, x.shape[2] // s
    return x.reshape(n, h, s, w, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, s * s * c)


SMALL_OUTPUT = 4  # output positions (height x width) up to which a convolution is a matmul on patches


def conv(p: Params, layer: Conv, x: jax.Array) -> jax.Array:
    """The zoo's convolution; as patches @ kernel when its output has few positions."""
    k, s = layer.kernel, layer.stride
    ho = (x.shape[1] + 2 * layer.padding - k) // s + 1
    wo = (x.shape[2] + 2 * layer.padding - k) // s + 1
    if ho * wo > SMALL_OUTPUT:
        return models.conv(p, layer, x)
    kernel = p[f"{layer.name}/kernel"]
    y = _patches(layer, x, ho, wo) @ kernel.reshape(-1, kernel.shape[-1])
    return y + p[f"{layer.name}/bias"] if layer.bias else y


def _offset_blocks(layer: Conv, x: jax.Array, g: jax.Array) -> tuple[list[jax.Array], int]:
    """Each example's kernel gradient as (N, s*s*C, O) blocks, one per kernel offset, and the padded kernel size.

    A strided convolution first becomes a stride-1 one on a space-to-depth input, its kernel zero-padded to a
    multiple of the stride: fewer, wider views. No block forms the (N, T, k*k*C) patches.
    """
    _, ho, wo, _ = g.shape
    s = layer.stride
    k_pad = -(-layer.kernel // s) * s
    x = _pad(x, layer.padding)
    if s > 1:
        x = _space_to_depth(x, s)
    return [jnp.einsum("bhwc,bhwo->bco", v, g) for v in _windows(x, k_pad // s, 1, ho, wo)], k_pad


def conv_per_example(layer: Conv, x: jax.Array, g: jax.Array) -> jax.Array:
    """Each example's kernel gradient, (N, k, k, C, O), from the layer input x and output gradient g."""
    n, _, _, o = g.shape
    k, s, c = layer.kernel, layer.stride, x.shape[-1]
    blocks, k_pad = _offset_blocks(layer, x, g)
    offsets = k_pad // s
    # (N, offsets^2, s*s*C, O) -> (N, k_pad, k_pad, C, O): undo the space-to-depth of the kernel.
    kernel = jnp.stack(blocks, axis=1).reshape(n, offsets, offsets, s, s, c, o).transpose(0, 1, 3, 2, 4, 5, 6)
    return kernel.reshape(n, k_pad, k_pad, c, o)[:, :k, :k]


def conv_sq_norms(layer: Conv, x: jax.Array, g: jax.Array) -> jax.Array:
    """Squared norm of each example's kernel gradient, from the layer input x and output gradient g.

    A ghost norm (Li et al. 2022) when there are few output positions; otherwise from the per-example
    gradient's blocks (any layout has the same norm, unless kernel padding must be cut off first).
    """
    n, ho, wo, o = g.shape
    k, s, c = layer.kernel, layer.stride, x.shape[-1]
    t = ho * wo
    if 2 * t * (k * k * c + o) < k * k * c * o:
        a = _patches(layer, x, ho, wo).reshape(n, t, -1)
        g2 = g.reshape(n, t, o)
        return jnp.sum(jnp.einsum("btk,bsk->bts", a, a) * jnp.einsum("bto,bso->bts", g2, g2), axis=(1, 2))
    if k % s:
        return jnp.sum(conv_per_example(layer, x, g) ** 2, axis=(1, 2, 3, 4))
    return sum(jnp.sum(block**2, axis=(1, 2)) for block in _offset_blocks(layer, x, g)[0])


def max_pool(layer: MaxPool, x: jax.Array) -> jax.Array:
    """Max pooling (padding with -inf) as the maximum of size*size strided slices."""
    p, k, s = layer.padding, layer.size, layer.stride
    if p:
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    return reduce(jnp.maximum, _windows(x, k, s, ho, wo))


def _trainable(p: Params, layer: Conv | Dense | GroupNorm, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(what the layer's parameter gradients are built from, the layer's output)."""
    if isinstance(layer, Conv):
        return x, conv(p, layer, x)
    if isinstance(layer, Dense):
        return x, x @ p[f"{layer.name}/kernel"] + p[f"{layer.name}/bias"]
    xhat = normalize(layer, x)
    return xhat, xhat * p[f"{layer.name}/scale"] + p[f"{layer.name}/bias"]


def _walk(p: Params, taps: Acts | None, layers: tuple[Layer, ...], x: jax.Array, acts: Acts, outs: Acts) -> jax.Array:
    """Apply `layers`, recording each trainable layer's gradient input in `acts` and its output in `outs`."""
    for layer in layers:
        if isinstance(layer, Conv | Dense | GroupNorm):
            acts[layer.name], x = _trainable(p, layer, x)
            outs[layer.name] = x
            if taps is not None:
                x = x + taps[layer.name]
        elif isinstance(layer, Residual):
            body = _walk(p, taps, layer.body, x, acts, outs)
            x = jax.nn.relu(body + _walk(p, taps, layer.shortcut, x, acts, outs))
        elif isinstance(layer, MaxPool):
            x = max_pool(layer, x)
        else:
            x = layer_apply(p, layer, x)
    return x


def make_apply(spec: ModelSpec) -> Callable[[Params, jax.Array], jax.Array]:
    """logits = apply(params, x), with slice max pooling."""
    return lambda params, x: _walk(params, None, spec.layers, x, {}, {})


def _tapped(spec: ModelSpec) -> Callable[[Params, Acts | None, jax.Array], tuple[jax.Array, Acts]]:
    def apply(params: Params, taps: Acts | None, x: jax.Array) -> tuple[jax.Array, Acts]:
        acts: Acts = {}
        return _walk(params, taps, spec.layers, x, acts, {}), acts

    return apply


def _rows(a: jax.Array) -> jax.Array:
    """(B, ..., D) -> (B, T, D): the positions a layer's weights are shared over."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


FEW_CHANNELS = 4  # input channels up to which a convolution's per-example kernel gradients are kept


def keeps_per_example(layer: Layer, a: jax.Array) -> bool:
    """A first convolution (few input channels) has small per-example kernel gradients, (k*k*C, O) each:
    computing them once serves both the norm and the weighted sum, cheaper than a second, weighted pass."""
    return isinstance(layer, Conv) and a.shape[-1] <= FEW_CHANNELS


def layer_norms(layer: Conv | Dense | GroupNorm, a: jax.Array, g: jax.Array, kept: jax.Array | None) -> jax.Array:
    """Squared norm of each example's gradient of this layer's parameters, from its inputs and output grads
    (or, for a convolution, from its kept per-example kernel gradients)."""
    if isinstance(layer, GroupNorm):
        return jnp.sum(jnp.sum(_rows(g * a), 1) ** 2, 1) + jnp.sum(jnp.sum(_rows(g), 1) ** 2, 1)
    if isinstance(layer, Conv):
        norms = conv_sq_norms(layer, a, g) if kept is None else jnp.sum(kept**2, axis=(1, 2, 3, 4))
        return norms + jnp.sum(jnp.sum(_rows(g), 1) ** 2, 1) if layer.bias else norms
    # Dense: the per-example gradient is the outer product a g^T, whose norm factorises.
    return jnp.sum(a**2, 1) * jnp.sum(g**2, 1) + jnp.sum(g**2, 1)


def layer_grads(
    layer: Conv | Dense | GroupNorm, a: jax.Array, g: jax.Array, weights: jax.Array, p: Params, kept: jax.Array | None
) -> Params:
    """The weighted sum over examples of this layer's per-example parameter gradients."""
    name = layer.name
    g = g * weights.reshape(-1, *([1] * (g.ndim - 1)))
    if isinstance(layer, GroupNorm):
        return {f"{name}/scale": jnp.sum(_rows(g * a), (0, 1)), f"{name}/bias": jnp.sum(_rows(g), (0, 1))}
    g2 = _rows(g).reshape(-1, g.shape[-1])
    if kept is not None:
        out = {f"{name}/kernel": jnp.tensordot(weights, kept, axes=1)}
    elif isinstance(layer, Conv):  # the filter gradient of the weighted output gradients
        kernel = p[f"{name}/kernel"]
        _, vjp = jax.vjp(lambda k: conv({**p, f"{name}/kernel": k}, layer, a), kernel)
        out = {f"{name}/kernel": vjp(g)[0]}
    else:
        out = {f"{name}/kernel": a.T @ g2}
    if isinstance(layer, Dense) or layer.bias:
        out[f"{name}/bias"] = jnp.sum(g2, 0)
    return out


def _trainable_layers(layers: tuple[Layer, ...]) -> list[Conv | Dense | GroupNorm]:
    found: list[Conv | Dense | GroupNorm] = []
    for layer in layers:
        if isinstance(layer, Conv | Dense | GroupNorm):
            found.append(layer)
        elif isinstance(layer, Residual):
            found += _trainable_layers(layer.body) + _trainable_layers(layer.shortcut)
    return found


def make_clipped_sum(spec: ModelSpec, loss_fn: Callable, clip: Callable) -> Callable:
    """(params, x, y, mask) -> (sum of clipped per-example grads, loss sum, correct count).

    `loss_fn(logits, y)` gives per-example losses; `clip(norms, mask)` the clipping weights.
    """
    apply = _tapped(spec)
    layers = _trainable_layers(spec.layers)

    def clipped_sum(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array):
        out_shapes = jax.eval_shape(partial(_output_shapes, spec), params, x)
        taps = {k: jnp.zeros(s.shape, s.dtype) for k, s in out_shapes.items()}

        def loss(taps: Acts):
            logits, acts = apply(params, taps, x)
            losses = loss_fn(logits, y) * mask
            return jnp.sum(losses), (logits, acts)

        (loss_sum, (logits, acts)), out_grads = jax.value_and_grad(loss, has_aux=True)(taps)
        kept = {
            layer.name: conv_per_example(layer, acts[layer.name], out_grads[layer.name])
            for layer in layers
            if keeps_per_example(layer, acts[layer.name])
        }
        parts = [(layer, acts[layer.name], out_grads[layer.name], kept.get(layer.name)) for layer in layers]
        norms = jnp.sqrt(sum(layer_norms(layer, a, g, per_example) for layer, a, g, per_example in parts))
        weights = clip(norms, mask)
        grads: Params = {}
        for layer, a, g, per_example in parts:
            grads.update(layer_grads(layer, a, g, weights, params, per_example))
        correct = jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32) * mask)
        return {k: grads[k] for k in params}, loss_sum, correct

    return clipped_sum


def _output_shapes(spec: ModelSpec, params: Params, x: jax.Array) -> Acts:
    """Each trainable layer's output (traced by eval_shape, for the shapes of the zero taps)."""
    outs: Acts = {}
    _walk(params, None, spec.layers, x, {}, outs)
    return outs
