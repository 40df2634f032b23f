"""The zoo in PyTorch: an Opacus-compatible `nn.Module` from the framework-neutral spec.

Only layers Opacus has per-sample gradient samplers for carry parameters (Conv2d, Linear,
GroupNorm); everything else is parameter-free, with no in-place ops, so the hooks,
functorch and ghost-clipping grad-sample modules all see the same graph. The module takes
NHWC batches (the core's layout) and converts to NCHW once, at the input.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench.models import Act, Conv, Dense, Flatten, GlobalAvgPool, GroupNorm, Layer, MaxPool, ModelSpec, Residual

GN_EPS = 1e-5

ParamModule = nn.Conv2d | nn.Linear | nn.GroupNorm


class FlattenNHWC(nn.Module):
    """Flatten in NHWC order, so the canonical dense kernel after it needs no row permutation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        return x.reshape(x.shape[0], -1)


class GlobalAvgPool2d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class ResidualBlock(nn.Module):
    """relu(body(x) + shortcut(x)); an empty shortcut is the identity."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Sequential):
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ZooNet(nn.Module):
    """A zoo model on NHWC input; `named` maps canonical layer names to their modules."""

    def __init__(self, layers: nn.Sequential, named: dict[str, ParamModule]):
        super().__init__()
        self.layers = layers
        object.__setattr__(self, "named", named)  # a plain dict: not registered twice as submodules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A fresh NCHW-contiguous copy, not .contiguous(): for C == 1 the permuted view already counts
        # as contiguous but has channels-last strides, so the convolutions return channels-last
        # activations, and Opacus' unfold2d (hooks and ghost Conv2d grad samplers) silently computes
        # wrong per-sample gradients for channels-last inputs of an unpadded conv (as_strided assumes
        # NCHW-contiguous memory).
        return self.layers(x.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format))


def _build(
    layers: tuple[Layer, ...], shape: tuple[int, ...], named: dict[str, ParamModule]
) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Modules for `layers` on inputs of per-example `shape` (C, H, W or (features,))."""
    mods: list[nn.Module] = []
    for layer in layers:
        mod, shape = _build_layer(layer, shape, named)
        mods.append(mod)
    return nn.Sequential(*mods), shape


def _out_hw(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1


def _build_layer(
    layer: Layer, shape: tuple[int, ...], named: dict[str, ParamModule]
) -> tuple[nn.Module, tuple[int, ...]]:
    if isinstance(layer, Conv):
        c, h, w = shape
        mod = nn.Conv2d(c, layer.features, layer.kernel, layer.stride, layer.padding, bias=layer.bias)
        named[layer.name] = mod
        return mod, (layer.features, *_out_hw(h, w, layer.kernel, layer.stride, layer.padding))
    if isinstance(layer, Dense):
        mod = nn.Linear(shape[0], layer.features)
        named[layer.name] = mod
        return mod, (layer.features,)
    if isinstance(layer, Act):
        return (nn.ReLU() if layer.kind == "relu" else nn.Tanh()), shape
    if isinstance(layer, MaxPool):
        c, h, w = shape
        out = (c, *_out_hw(h, w, layer.size, layer.stride, layer.padding))
        return nn.MaxPool2d(layer.size, layer.stride, layer.padding), out
    if isinstance(layer, GroupNorm):
        mod = nn.GroupNorm(layer.groups, shape[0], eps=GN_EPS)
        named[layer.name] = mod
        return mod, shape
    if isinstance(layer, Flatten):
        return FlattenNHWC(), (int(np.prod(shape)),)
    if isinstance(layer, GlobalAvgPool):
        return GlobalAvgPool2d(), (shape[0],)
    if isinstance(layer, Residual):
        body, out = _build(layer.body, shape, named)
        shortcut, _ = _build(layer.shortcut, shape, named)
        return ResidualBlock(body, shortcut), out
    raise TypeError(f"unsupported layer {layer!r}")


def build_module(spec: ModelSpec, params: dict[str, np.ndarray]) -> ZooNet:
    """The zoo model `spec` with the canonical weights `params` loaded (float32, on CPU)."""
    h, w, c = spec.input_shape
    named: dict[str, ParamModule] = {}
    layers, _ = _build(spec.layers, (c, h, w), named)
    net = ZooNet(layers, named)
    load_canonical(net, params)
    return net


def _to_torch_layout(mod: ParamModule, kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "kernel" and isinstance(mod, nn.Conv2d):
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if kind == "kernel":
        return value.T  # (in, out) -> (out, in)
    return value


def _from_torch_layout(mod: ParamModule, kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "kernel" and isinstance(mod, nn.Conv2d):
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if kind == "kernel":
        return value.T
    return value


def _torch_param(mod: ParamModule, kind: str) -> nn.Parameter:
    return mod.weight if kind in ("kernel", "scale") else mod.bias


def load_canonical(net: ZooNet, params: dict[str, np.ndarray]) -> None:
    """Copy canonical weights (HWIO conv, (in, out) dense, GroupNorm scale/bias) into `net`."""
    expected = {f"{name}/{kind}" for name, mod in net.named.items() for kind in _kinds(mod)}
    if set(params) != expected:
        raise ValueError(
            f"parameter names differ: missing {sorted(expected - set(params))}, "
            f"unexpected {sorted(set(params) - expected)}"
        )
    with torch.no_grad():
        for key, value in params.items():
            name, kind = key.rsplit("/", 1)
            mod = net.named[name]
            target = _torch_param(mod, kind)
            source = torch.from_numpy(np.ascontiguousarray(_to_torch_layout(mod, kind, value), dtype=np.float32))
            if source.shape != target.shape:
                raise ValueError(f"{key}: canonical shape {value.shape} does not fit torch shape {tuple(target.shape)}")
            target.copy_(source)


def _kinds(mod: ParamModule) -> tuple[str, ...]:
    if isinstance(mod, nn.GroupNorm):
        return ("scale", "bias")
    return ("kernel", "bias") if mod.bias is not None else ("kernel",)


def canonical_params(net: ZooNet) -> dict[str, np.ndarray]:
    """The module's parameters back in the canonical layout and names."""
    out: dict[str, np.ndarray] = {}
    for name, mod in net.named.items():
        for kind in _kinds(mod):
            value = _torch_param(mod, kind).detach().cpu().numpy()
            # np.array copies: on CPU .numpy() shares memory with the parameter the optimizer updates in place
            out[f"{name}/{kind}"] = np.array(_from_torch_layout(mod, kind, value), order="C")
    return out
