"""Book-keeping DP-SGD (Bu et al. 2023, "Differentially Private Optimization on Large Model at Small Cost").

One forward pass records every trainable layer's input; one backward pass, taken to zero "taps" added to the
layer outputs, gives each layer's output gradients. From those two, per example and per layer, come the gradient
norms (as a ghost norm, Li et al. 2022, or from the per-example layer gradient, whichever costs less) and then
the clipped sum: each layer's filter gradient of its clip-weighted output gradients, or, where a layer's
per-example gradients are small (a GroupNorm, a convolution with few input channels) or formed for its norm
anyway (`kept_grads`), their weighted sum. There is no per-example gradient
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
from dataclasses import dataclass
from functools import partial, reduce

import jax
import jax.numpy as jnp
from jax import lax

from backends.jax.models import Params, conv_kernel, layer_apply, normalize
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
# Per-example kernel gradients formed for a norm are kept for the weighted sum up to this size per batch slice:
# the CNN's second convolution (4.5 MB for 139 rows) is; ResNet-18's first stage (11.8 MB for 80) is not: kept,
# its DP / non-private step went from 1.07 to 1.05 but the DP step's temporary buffer from 392 to 530 MB (304
# non-private), measured by `scripts/jax_side_by_side.py resnet --set KEPT_BYTES=16000000`.
KEPT_BYTES = 8_000_000
FEW_CHANNELS = 4  # input channels up to which a convolution's per-example kernel gradients are kept


def _s2d_kernel(kernel: jax.Array, s: int) -> jax.Array:
    """(k, k, C, O) -> (k'/s, k'/s, s*s*C, O), k' = k rounded up to a multiple of s: the kernel of the
    stride-1 convolution on a space-to-depth input that equals the stride-s convolution."""
    k, _, c, o = kernel.shape
    k_pad = -(-k // s) * s
    kernel = jnp.pad(kernel, ((0, k_pad - k), (0, k_pad - k), (0, 0), (0, 0)))
    n = k_pad // s
    return kernel.reshape(n, s, n, s, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(n, n, s * s * c, o)


def _s2d_conv(layer: Conv, kernel: jax.Array, x: jax.Array) -> jax.Array:
    """A strided convolution as a stride-1 one on the space-to-depth input: XLA's CPU back end runs a strided
    convolution of few input channels 2-4x slower, and its input gradient (a dilated convolution) 5x slower."""
    s = layer.stride
    ho, wo = _out_size(layer, x)
    y = lax.conv_general_dilated(
        _space_to_depth(_pad(x, layer.padding), s),
        _s2d_kernel(kernel, s),
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y[:, :ho, :wo]


def _input_form(layer: Conv) -> Callable[[Conv, jax.Array, jax.Array], jax.Array]:
    """The formulation whose gradient with respect to the input XLA:CPU runs fastest."""
    if layer.stride == 1:
        return conv_kernel
    if layer.kernel == 1 and layer.padding == 0:
        return lambda layer, k, x: x[:, :: layer.stride, :: layer.stride] @ k[0, 0]
    return _s2d_conv


def _forward_form(layer: Conv, x: jax.Array) -> Callable[[Conv, jax.Array, jax.Array], jax.Array]:
    return _s2d_conv if layer.stride > 1 and x.shape[-1] <= FEW_CHANNELS else conv_kernel


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_op(layer: Conv, kernel: jax.Array, x: jax.Array) -> jax.Array:
    """A convolution computed, and differentiated, in whichever form is fastest for each direction."""
    return _forward_form(layer, x)(layer, kernel, x)


def _conv_op_fwd(layer: Conv, kernel: jax.Array, x: jax.Array):
    return _conv_op(layer, kernel, x), (kernel, x)


def _conv_op_bwd(layer: Conv, res: tuple[jax.Array, jax.Array], g: jax.Array):
    kernel, x = res
    _, input_vjp = jax.vjp(lambda x: _input_form(layer)(layer, kernel, x), x)
    return filter_grad(layer, x, g, kernel), input_vjp(g)[0]


_conv_op.defvjp(_conv_op_fwd, _conv_op_bwd)


def filter_grad(layer: Conv, x: jax.Array, g: jax.Array, kernel: jax.Array) -> jax.Array:
    """The kernel gradient summed over the batch: XLA's own convolution filter gradient is its fastest form."""
    _, vjp = jax.vjp(lambda k: conv_kernel(layer, k, x), kernel)
    return vjp(g)[0]


def _out_size(layer: Conv, x: jax.Array) -> tuple[int, int]:
    k, s, p = layer.kernel, layer.stride, layer.padding
    return (x.shape[1] + 2 * p - k) // s + 1, (x.shape[2] + 2 * p - k) // s + 1


def conv(p: Params, layer: Conv, x: jax.Array) -> jax.Array:
    """The zoo's convolution; as patches @ kernel when its output has few positions."""
    ho, wo = _out_size(layer, x)
    kernel = p[f"{layer.name}/kernel"]
    if ho * wo > SMALL_OUTPUT:
        y = _conv_op(layer, kernel, x)
    else:
        y = _patches(layer, x, ho, wo) @ kernel.reshape(-1, kernel.shape[-1])
    return y + p[f"{layer.name}/bias"] if layer.bias else y


def _offset_blocks(layer: Conv, x: jax.Array, g: jax.Array) -> list[jax.Array]:
    """Each example's kernel gradient as (N, s*s*C, O) blocks, one per kernel offset (`_unblock` reassembles them).

    A strided convolution first becomes a stride-1 one on a space-to-depth input, its kernel zero-padded to a
    multiple of the stride: fewer, wider views. No block forms the (N, T, k*k*C) patches.
    """
    _, ho, wo, _ = g.shape
    s = layer.stride
    x = _pad(x, layer.padding)
    if s > 1:
        x = _space_to_depth(x, s)
    return [jnp.einsum("bhwc,bhwo->bco", v, g) for v in _windows(x, -(-layer.kernel // s), 1, ho, wo)]


def _unblock(layer: Conv, blocks: jax.Array, c: int) -> jax.Array:
    """(..., offsets^2, s*s*C, O) kernel-offset blocks (or sums of them) -> the (..., k, k, C, O) kernel."""
    k, s = layer.kernel, layer.stride
    offsets = -(-k // s)
    *lead, _, _, o = blocks.shape
    kernel = blocks.reshape(*lead, offsets, offsets, s, s, c, o)
    kernel = jnp.swapaxes(kernel, -5, -4).reshape(*lead, offsets * s, offsets * s, c, o)
    return kernel[..., :k, :k, :, :]


def _channel_first(x: jax.Array, padding: int, s: int = 1) -> jax.Array:
    """(N, H, W, C) -> (N, s*s*C, H', W'): `_space_to_depth(_pad(x, padding), s)`, channel-first. Padded after the
    transpose, so that XLA fuses the padding into `_channel_first_patches`' copies: padded before it, the padded
    input was the forward convolution's too, and XLA wrote it out once for both."""
    x = jnp.moveaxis(x, -1, 1)
    h, w = x.shape[2] + 2 * padding, x.shape[3] + 2 * padding
    x = jnp.pad(x, ((0, 0), (0, 0), (padding, padding + -h % s), (padding, padding + -w % s)))
    if s == 1:
        return x
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // s, s, w // s, s).transpose(0, 3, 5, 1, 2, 4)
    return x.reshape(n, s * s * c, h // s, w // s)


def _channel_first_patches(x: jax.Array, count: int, step: int, ho: int, wo: int) -> jax.Array:
    """(N, count*count*C, ho*wo): the count x count strided windows of an (N, C, H, W) input, rows in
    (row offset, column offset, channel) order. The column windows are copied first, then whole planes of them
    per row offset, rather than one strided view per kernel offset: XLA's CPU back end copies the short rows of
    count*count views and then stacks them, 1.4x slower for the CNN's first convolution's per-example gradients
    with their norms and weighted sum (`conv1-per-example` in tests/benchmarks/test_jax_kernels.py)."""
    n = x.shape[0]
    cols = jnp.concatenate([x[..., j : j + step * (wo - 1) + 1 : step] for j in range(count)], 1)
    rows = [cols[:, :, i : i + step * (ho - 1) + 1 : step] for i in range(count)]
    return jnp.concatenate(rows, 1).reshape(n, -1, ho * wo)


def _channel_first_blocks(layer: Conv, x: jax.Array, g: jax.Array) -> jax.Array:
    """The `_offset_blocks` as one (N, offsets^2, s*s*C, O) batched matmul of channel-first patches of the
    space-to-depth input. For few input channels, where it is the fastest form: with the norms and weighted
    sum, the CNN's first convolution at batch 2224 in the step's 28 slices took 66 ms as offset blocks, 30 as
    `conv_per_example`'s patches, 22 in this form (medians of one run of `conv1-per-example` in
    tests/benchmarks/test_jax_kernels.py)."""
    n, ho, wo, o = g.shape
    s = layer.stride
    offsets = -(-layer.kernel // s)
    patches = _channel_first_patches(_channel_first(x, layer.padding, s), offsets, 1, ho, wo)
    blocks = jnp.einsum("bkt,bto->bko", patches, g.reshape(n, ho * wo, o))
    return blocks.reshape(n, offsets**2, -1, o)


def conv_per_example(layer: Conv, x: jax.Array, g: jax.Array) -> jax.Array:
    """Each example's kernel gradient, (N, k, k, C, O), from the layer input x and output gradient g.

    With few input channels, one batched matmul of channel-first patches with the output gradients; with more,
    a matmul per kernel offset, which needs no patches. Measured on 2 CPU cores, with the norms and weighted sum
    that use them, in the step's batch slices: ResNet-18's first convolution (7x7, stride 2) 56 -> 45 ms at
    batch 320 (one run of `resnet-conv1-per-example` in tests/benchmarks/test_jax_kernels.py). Patches would make
    the norms alone of ResNet-18's 64-channel stride-2 convolution faster too (201 -> 76 ms, `many-channels-norms`),
    but FEW_CHANNELS = 64, which also keeps those per-example gradients for the weighted sum, made its DP step
    slower (1561 -> 1682 ms) and its temporary buffer larger (391 -> 612 MB), in one run of
    `scripts/jax_side_by_side.py resnet --set FEW_CHANNELS=64`.
    """
    n, ho, wo, o = g.shape
    k, c = layer.kernel, x.shape[-1]
    if c <= FEW_CHANNELS:
        patches = _channel_first_patches(_channel_first(x, layer.padding), k, layer.stride, ho, wo)
        rows = jnp.einsum("bkt,bto->bko", patches, g.reshape(n, ho * wo, o))
        return rows.reshape(n, k, k, c, o)
    return _unblock(layer, jnp.stack(_offset_blocks(layer, x, g), 1), c)


def _ghost_cheaper(layer: Conv, c: int, g: jax.Array) -> bool:
    """Whether a ghost norm costs less than the per-example kernel gradient (few output positions)."""
    t, o = g.shape[1] * g.shape[2], g.shape[-1]
    return 2 * t * (layer.kernel**2 * c + o) < layer.kernel**2 * c * o


def conv_sq_norms(layer: Conv, x: jax.Array, g: jax.Array) -> jax.Array:
    """Squared norm of each example's kernel gradient, from the layer input x and output gradient g.

    A ghost norm (Li et al. 2022) when there are few output positions; otherwise from the per-example
    gradient's blocks (any layout has the same norm, unless kernel padding must be cut off first).
    """
    n, ho, wo, o = g.shape
    if _ghost_cheaper(layer, x.shape[-1], g):
        a = _patches(layer, x, ho, wo).reshape(n, ho * wo, -1)
        g2 = g.reshape(n, ho * wo, o)
        return jnp.sum(jnp.einsum("btk,bsk->bts", a, a) * jnp.einsum("bto,bso->bts", g2, g2), axis=(1, 2))
    if layer.kernel % layer.stride:
        return jnp.sum(conv_per_example(layer, x, g) ** 2, axis=(1, 2, 3, 4))
    return sum(jnp.sum(block**2, axis=(1, 2)) for block in _offset_blocks(layer, x, g))


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


@dataclass(frozen=True)
class Kept:
    """A layer's per-example gradients, formed once to serve both the norm and the weighted sum: `per_example`
    holds (N, ...) arrays whose squares sum to the norm, `finish` turns their weighted sums into parameters."""

    per_example: dict[str, jax.Array]
    finish: Callable[[dict[str, jax.Array]], Params] = dict


def kept_grads(layer: Conv | Dense | GroupNorm, a: jax.Array, g: jax.Array) -> Kept | None:
    """Each example's parameter gradients of a layer where they are small, or None (the layer's clipped sum is
    then a second, weighted filter gradient). Kept: a GroupNorm's (2C per example), a convolution's with few
    input channels, and those of one whose per-example kernel gradients the norm forms anyway (`_offset_blocks`,
    at most KEPT_BYTES for the batch): their weighted sum is then cheaper than the filter gradient. Kernel
    gradients are kept as offset blocks where the kernel size is a multiple of the stride, and `finish`
    reassembles only their weighted sum."""
    name, key = layer.name, f"{layer.name}/kernel"
    if isinstance(layer, GroupNorm):
        return Kept({f"{name}/scale": jnp.sum(_rows(g * a), 1), f"{name}/bias": jnp.sum(_rows(g), 1)})
    if not isinstance(layer, Conv):
        return None
    bias = {f"{name}/bias": jnp.sum(_rows(g), 1)} if layer.bias else {}
    c = a.shape[-1]

    def finish(sums: dict[str, jax.Array]) -> Params:
        return {**sums, key: _unblock(layer, sums[key], c)}

    if layer.kernel % layer.stride:  # kernel blocks would hold padding: kept only with few channels, as is
        return Kept({key: conv_per_example(layer, a, g), **bias}) if c <= FEW_CHANNELS else None
    if c <= FEW_CHANNELS:
        return Kept({key: _channel_first_blocks(layer, a, g), **bias}, finish)
    if _ghost_cheaper(layer, c, g) or a.dtype.itemsize * a.shape[0] * layer.kernel**2 * c * g.shape[-1] > KEPT_BYTES:
        return None
    # One entry per block, not one stacked array: the stack was a copy of them all (4.5 MB per slice of the
    # CNN's second convolution), read once more for the norms and the weighted sum.
    blocks = {f"{key}#{i}": block for i, block in enumerate(_offset_blocks(layer, a, g))}

    def finish_blocks(sums: dict[str, jax.Array]) -> Params:
        rest = {k: v for k, v in sums.items() if k not in blocks}
        return {**rest, key: _unblock(layer, jnp.stack([sums[k] for k in blocks]), c)}

    return Kept({**blocks, **bias}, finish_blocks)


def layer_norms(layer: Conv | Dense, a: jax.Array, g: jax.Array) -> jax.Array:
    """Squared norm of each example's gradient of this layer's parameters, from its inputs and output grads."""
    if isinstance(layer, Conv):
        norms = conv_sq_norms(layer, a, g)
        return norms + jnp.sum(jnp.sum(_rows(g), 1) ** 2, 1) if layer.bias else norms
    # Dense: the per-example gradient is the outer product a g^T, whose norm factorises.
    return jnp.sum(a**2, 1) * jnp.sum(g**2, 1) + jnp.sum(g**2, 1)


def layer_grads(layer: Conv | Dense, a: jax.Array, g: jax.Array, weights: jax.Array, p: Params) -> Params:
    """The weighted sum over examples of this layer's per-example parameter gradients."""
    name = layer.name
    g = g * weights.reshape(-1, *([1] * (g.ndim - 1)))
    g2 = _rows(g).reshape(-1, g.shape[-1])
    if isinstance(layer, Conv):  # the filter gradient of the weighted output gradients
        kernel = p[f"{name}/kernel"]
        _, vjp = jax.vjp(lambda k: conv({**p, f"{name}/kernel": k}, layer, a), kernel)
        out = {f"{name}/kernel": vjp(g)[0]}
    else:
        out = {f"{name}/kernel": a.T @ g2}
    if isinstance(layer, Dense) or layer.bias:
        out[f"{name}/bias"] = jnp.sum(g2, 0)
    return out


def _sq_norms(kept: Kept) -> jax.Array:
    return sum(jnp.sum(v.reshape(v.shape[0], -1) ** 2, 1) for v in kept.per_example.values())


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
        kept = {layer.name: kept_grads(layer, acts[layer.name], out_grads[layer.name]) for layer in layers}
        rest = [(layer, acts[layer.name], out_grads[layer.name]) for layer in layers if kept[layer.name] is None]
        norms = jnp.sqrt(
            sum(_sq_norms(part) for part in kept.values() if part is not None)
            + sum(layer_norms(*part) for part in rest)
        )
        weights = clip(norms, mask)
        grads: Params = {}
        for part in kept.values():
            if part is not None:
                sums = {name: jnp.tensordot(weights, v, axes=1) for name, v in part.per_example.items()}
                grads.update(part.finish(sums))
        for layer, a, g in rest:
            grads.update(layer_grads(layer, a, g, weights, params))
        correct = jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32) * mask)
        return {k: grads[k] for k in params}, loss_sum, correct

    return clipped_sum


def _output_shapes(spec: ModelSpec, params: Params, x: jax.Array) -> Acts:
    """Each trainable layer's output (traced by eval_shape, for the shapes of the zero taps)."""
    outs: Acts = {}
    _walk(params, None, spec.layers, x, {}, outs)
    return outs
