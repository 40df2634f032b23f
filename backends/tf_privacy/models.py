"""The zoo in Keras: a functional `tf.keras.Model` from the framework-neutral spec.

Keras' native layouts are the canonical ones (NHWC, HWIO conv kernels, (in, out) dense
kernels), so weights load without transposes. Explicit symmetric padding becomes a
ZeroPadding2D (convolutions) or a -inf pad (max pooling) before a "valid" layer.
Only Conv2D, Dense and GroupNormalization carry weights, so `named` maps each canonical
parameter name to exactly one Keras variable.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from bench.models import Act, Conv, Dense, Flatten, GlobalAvgPool, GroupNorm, Layer, MaxPool, ModelSpec, Residual

GN_EPS = 1e-5
keras = tf.keras


class NegInfPad2D(keras.layers.Layer):
    """Pad H and W with -inf, so a following "valid" max pool matches a padded one."""

    def __init__(self, padding: int, **kwargs):
        super().__init__(**kwargs)
        self.padding = padding

    def call(self, x: tf.Tensor) -> tf.Tensor:
        p = self.padding
        return tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], constant_values=-np.inf)


class _Builder:
    def __init__(self) -> None:
        self.named: dict[str, tf.Variable] = {}
        self._weighted: list[tuple[str, keras.layers.Layer, tuple[str, ...]]] = []

    def sequence(self, layers: tuple[Layer, ...], x: tf.Tensor) -> tf.Tensor:
        for layer in layers:
            x = self.layer(layer, x)
        return x

    def layer(self, layer: Layer, x: tf.Tensor) -> tf.Tensor:
        if isinstance(layer, Conv):
            if layer.padding:
                x = keras.layers.ZeroPadding2D(layer.padding)(x)
            conv = keras.layers.Conv2D(
                layer.features, layer.kernel, strides=layer.stride, use_bias=layer.bias, name=layer.name
            )
            return self._weights(conv, layer.name, ("kernel", "bias") if layer.bias else ("kernel",), x)
        if isinstance(layer, Dense):
            return self._weights(keras.layers.Dense(layer.features, name=layer.name), layer.name, ("kernel", "bias"), x)
        if isinstance(layer, GroupNorm):
            norm = keras.layers.GroupNormalization(layer.groups, epsilon=GN_EPS, name=layer.name)
            return self._weights(norm, layer.name, ("scale", "bias"), x)
        if isinstance(layer, Act):
            return keras.layers.Activation(layer.kind)(x)
        if isinstance(layer, MaxPool):
            if layer.padding:
                x = NegInfPad2D(layer.padding)(x)
            return keras.layers.MaxPooling2D(layer.size, layer.stride)(x)
        if isinstance(layer, Flatten):
            return keras.layers.Flatten()(x)
        if isinstance(layer, GlobalAvgPool):
            return keras.layers.GlobalAveragePooling2D()(x)
        if isinstance(layer, Residual):
            body = self.sequence(layer.body, x)
            shortcut = self.sequence(layer.shortcut, x)
            return keras.layers.Activation("relu")(keras.layers.Add()([body, shortcut]))
        raise TypeError(f"unsupported layer {layer!r}")

    def _weights(self, module: keras.layers.Layer, name: str, kinds: tuple[str, ...], x: tf.Tensor) -> tf.Tensor:
        y = module(x)  # builds the variables, in Keras' order: (kernel|gamma, bias|beta)
        for kind, var in zip(kinds, module.trainable_variables, strict=True):
            self.named[f"{name}/{kind}"] = var
        return y


def build_model(spec: ModelSpec, params: dict[str, np.ndarray]) -> tuple[keras.Model, dict[str, tf.Variable]]:
    """The Keras model of `spec` with the canonical weights loaded; canonical name -> variable."""
    builder = _Builder()
    inputs = keras.Input(spec.input_shape)
    outputs = builder.sequence(spec.layers, inputs)
    model = keras.Model(inputs, outputs, name=spec.name.replace("-", "_"))
    if sorted(builder.named) != sorted(params):
        raise ValueError(f"keras {spec.name}: parameters {sorted(builder.named)} != canonical {sorted(params)}")
    for name, var in builder.named.items():
        var.assign(params[name])
    return model, builder.named
