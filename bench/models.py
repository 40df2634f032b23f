"""The model zoo as framework-neutral specs, with canonical parameter layouts.

A model is a tuple of layers; every backend walks the same tuple. Canonical layouts:
conv kernels HWIO, dense kernels (in, out), activations NHWC, flatten in NHWC order.
Padding is explicit and symmetric (PyTorch style), so every framework can express it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Activation = Literal["relu", "tanh"]


@dataclass(frozen=True)
class Conv:
    name: str
    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    bias: bool = True


@dataclass(frozen=True)
class Dense:
    name: str
    features: int


@dataclass(frozen=True)
class Act:
    kind: Activation


@dataclass(frozen=True)
class MaxPool:
    size: int
    stride: int
    padding: int = 0


@dataclass(frozen=True)
class GroupNorm:
    """GroupNorm(min(32, C), C) with affine scale/bias, eps 1e-5 (torch's default)."""

    name: str
    groups: int


@dataclass(frozen=True)
class GlobalAvgPool:
    pass


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class Residual:
    """relu(body(x) + shortcut(x)); an empty shortcut is the identity."""

    body: tuple[Layer, ...]
    shortcut: tuple[Layer, ...] = ()


Layer = Conv | Dense | Act | MaxPool | GroupNorm | GlobalAvgPool | Flatten | Residual


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: tuple[Layer, ...]
    input_shape: tuple[int, int, int]  # H, W, C
    num_classes: int


def _mlp(input_shape: tuple[int, int, int], num_classes: int) -> tuple[Layer, ...]:
    return (Flatten(), Dense("fc1", 200), Act("relu"), Dense("fc2", 200), Act("relu"), Dense("fc3", num_classes))


def _cnn_small(act: Activation, num_classes: int) -> tuple[Layer, ...]:
    """The Opacus MNIST example CNN; with tanh it is Tramer & Boneh (2021)'s MNIST CNN."""
    return (
        Conv("conv1", 16, 8, stride=2, padding=3),
        Act(act),
        MaxPool(2, 1),
        Conv("conv2", 32, 4, stride=2),
        Act(act),
        MaxPool(2, 1),
        Flatten(),
        Dense("fc1", 32),
        Act(act),
        Dense("fc2", num_classes),
    )


def _cnn_tanh_cifar(num_classes: int) -> tuple[Layer, ...]:
    """Tramer & Boneh (2021), "Differentially Private Learning Needs Better Features", CIFAR-10 CNN."""
    layers: list[Layer] = []
    i = 0
    for width in (32, 64, 128):
        for _ in range(2):
            i += 1
            layers += [Conv(f"conv{i}", width, 3, padding=1), Act("tanh")]
        layers.append(MaxPool(2, 2))
    return (*layers, Flatten(), Dense("fc", num_classes))


def _gn(name: str, channels: int) -> GroupNorm:
    return GroupNorm(name, min(32, channels))


def _resnet18_gn(num_classes: int) -> tuple[Layer, ...]:
    """torchvision ResNet-18 with BatchNorm replaced by GroupNorm(min(32, C), C) (Opacus' fix)."""
    layers: list[Layer] = [
        Conv("conv1", 64, 7, stride=2, padding=3, bias=False),
        _gn("gn1", 64),
        Act("relu"),
        MaxPool(3, 2, padding=1),
    ]
    in_ch = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            p = f"layer{stage}.{block}"
            body = (
                Conv(f"{p}.conv1", width, 3, stride=stride, padding=1, bias=False),
                _gn(f"{p}.gn1", width),
                Act("relu"),
                Conv(f"{p}.conv2", width, 3, padding=1, bias=False),
                _gn(f"{p}.gn2", width),
            )
            shortcut: tuple[Layer, ...] = ()
            if stride != 1 or in_ch != width:
                shortcut = (Conv(f"{p}.down", width, 1, stride=stride, bias=False), _gn(f"{p}.down_gn", width))
            layers.append(Residual(body, shortcut))
            in_ch = width
    return (*layers, GlobalAvgPool(), Dense("fc", num_classes))


MODELS: tuple[str, ...] = ("mlp", "cnn-mnist", "cnn-tanh", "resnet18-gn")


def build_spec(name: str, input_shape: tuple[int, int, int], num_classes: int) -> ModelSpec:
    """The zoo model `name` for inputs of `input_shape` (H, W, C); `cnn-tanh` picks its variant."""
    h, w, c = input_shape
    if name == "mlp":
        layers = _mlp(input_shape, num_classes)
    elif name in ("cnn-mnist", "cnn-tanh"):
        if name == "cnn-tanh" and (h, w) == (32, 32):
            layers = _cnn_tanh_cifar(num_classes)
        elif (h, w) == (28, 28):
            layers = _cnn_small("relu" if name == "cnn-mnist" else "tanh", num_classes)
        else:
            raise ValueError(
                f"model {name!r} needs 28x28 inputs{' or 32x32' if name == 'cnn-tanh' else ''}, got {h}x{w}"
            )
    elif name == "resnet18-gn":
        if h < 32 or w < 32:
            raise ValueError(f"model 'resnet18-gn' needs inputs of at least 32x32, got {h}x{w}")
        layers = _resnet18_gn(num_classes)
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return ModelSpec(name, layers, input_shape, num_classes)


def _conv_out(size: int, layer: Conv | MaxPool) -> int:
    k = layer.kernel if isinstance(layer, Conv) else layer.size
    return (size + 2 * layer.padding - k) // layer.stride + 1


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes, in a fixed order (the initialiser's order)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def walk(layers: tuple[Layer, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        for layer in layers:
            if isinstance(layer, Conv):
                h, w, c = shape
                shapes[f"{layer.name}/kernel"] = (layer.kernel, layer.kernel, c, layer.features)
                if layer.bias:
                    shapes[f"{layer.name}/bias"] = (layer.features,)
                shape = (_conv_out(h, layer), _conv_out(w, layer), layer.features)
            elif isinstance(layer, MaxPool):
                h, w, c = shape
                shape = (_conv_out(h, layer), _conv_out(w, layer), c)
            elif isinstance(layer, Dense):
                (n,) = shape
                shapes[f"{layer.name}/kernel"] = (n, layer.features)
                shapes[f"{layer.name}/bias"] = (layer.features,)
                shape = (layer.features,)
            elif isinstance(layer, GroupNorm):
                shapes[f"{layer.name}/scale"] = (shape[-1],)
                shapes[f"{layer.name}/bias"] = (shape[-1],)
            elif isinstance(layer, Flatten):
                shape = (int(np.prod(shape)),)
            elif isinstance(layer, GlobalAvgPool):
                shape = (shape[-1],)
            elif isinstance(layer, Residual):
                out = walk(layer.body, shape)
                walk(layer.shortcut, shape)
                shape = out
        return shape

    walk(spec.layers, spec.input_shape)
    return shapes


def init_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 weights in the canonical layout, PyTorch's default initialisation.

    Kernels and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5),
    as torch.nn.Linear/Conv2d); GroupNorm scale 1, bias 0.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    shapes = param_shapes(spec)
    params: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        layer, kind = name.rsplit("/", 1)
        kernel = shapes.get(f"{layer}/kernel")
        if kernel is None:  # GroupNorm
            value = np.ones(shape) if kind == "scale" else np.zeros(shape)
        else:
            fan_in = int(np.prod(kernel[:-1]))
            bound = 1.0 / np.sqrt(fan_in)
            value = rng.uniform(-bound, bound, size=shape)
        params[name] = value.astype(np.float32)
    return params


def num_params(spec: ModelSpec) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(spec).values())
