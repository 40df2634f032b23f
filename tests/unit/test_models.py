"""bench.models: zoo specs, canonical parameter layouts and counts, seeded initialiser."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.models import (
    MODELS,
    Act,
    Conv,
    Dense,
    GroupNorm,
    ModelSpec,
    Residual,
    build_spec,
    init_params,
    num_params,
    param_shapes,
)

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)


def conv(k: int, cin: int, cout: int, bias: bool = True) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def out_size(size: int, k: int, stride: int = 1, pad: int = 0) -> int:
    return (size + 2 * pad - k) // stride + 1


# --------------------------------------------------------------------------- counts


def test_mlp_count():
    spec = build_spec("mlp", MNIST, 10)
    assert num_params(spec) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10 == 199_210


def test_cnn_mnist_count_is_the_opacus_mnist_example():
    # Opacus examples/mnist.py: Conv2d(1, 16, 8, 2, padding=3), MaxPool2d(2, 1), Conv2d(16, 32, 4, 2),
    # MaxPool2d(2, 1), Linear(32 * 4 * 4, 32), Linear(32, 10).
    s = out_size(28, 8, 2, 3)  # 14
    s = out_size(s, 2, 1)  # 13
    s = out_size(s, 4, 2)  # 5
    s = out_size(s, 2, 1)  # 4
    assert s == 4
    expected = conv(8, 1, 16) + conv(4, 16, 32) + dense(32 * s * s, 32) + dense(32, 10)
    assert expected == 26_010
    assert num_params(build_spec("cnn-mnist", MNIST, 10)) == expected


def resnet18_count(in_ch: int, classes: int) -> int:
    """torchvision resnet18 with fc -> classes; every BatchNorm's affine (2C) becomes GroupNorm's affine (2C)."""
    total = conv(7, in_ch, 64, bias=False) + 2 * 64
    cin = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            total += conv(3, cin, width, bias=False) + 2 * width + conv(3, width, width, bias=False) + 2 * width
            if block == 0 and cin != width:
                total += conv(1, cin, width, bias=False) + 2 * width  # downsample conv + norm
            cin = width
    return total + dense(512, classes)


def test_resnet18_gn_count_is_torchvision_resnet18():
    assert resnet18_count(3, 1000) == 11_689_512  # torchvision's published resnet18 size
    assert resnet18_count(3, 10) == 11_181_642
    assert num_params(build_spec("resnet18-gn", CIFAR, 10)) == 11_181_642


def test_cnn_tanh_cifar_count():
    # Tramer & Boneh (2021): [32, 32, M, 64, 64, M, 128, 128, M] 3x3 convs (padding 1), tanh, then Linear.
    expected = (
        conv(3, 3, 32) + conv(3, 32, 32) + conv(3, 32, 64) + conv(3, 64, 64) + conv(3, 64, 128) + conv(3, 128, 128)
    ) + dense(128 * 4 * 4, 10)
    assert num_params(build_spec("cnn-tanh", CIFAR, 10)) == expected == 307_498


def test_num_params_is_sum_of_param_shapes():
    for name, shape in (("mlp", MNIST), ("cnn-mnist", MNIST), ("cnn-tanh", CIFAR), ("resnet18-gn", CIFAR)):
        spec = build_spec(name, shape, 10)
        assert num_params(spec) == sum(math.prod(s) for s in param_shapes(spec).values())


# --------------------------------------------------------------------------- layouts


def test_mlp_layout_dense_is_in_out():
    shapes = param_shapes(build_spec("mlp", MNIST, 10))
    assert shapes == {
        "fc1/kernel": (784, 200),
        "fc1/bias": (200,),
        "fc2/kernel": (200, 200),
        "fc2/bias": (200,),
        "fc3/kernel": (200, 10),
        "fc3/bias": (10,),
    }


def test_mlp_follows_input_shape_and_classes():
    shapes = param_shapes(build_spec("mlp", (8, 8, 1), 7))  # digits
    assert shapes["fc1/kernel"] == (64, 200) and shapes["fc3/kernel"] == (200, 7) and shapes["fc3/bias"] == (7,)


def test_cnn_mnist_layout_conv_is_hwio():
    shapes = param_shapes(build_spec("cnn-mnist", MNIST, 10))
    assert shapes == {
        "conv1/kernel": (8, 8, 1, 16),
        "conv1/bias": (16,),
        "conv2/kernel": (4, 4, 16, 32),
        "conv2/bias": (32,),
        "fc1/kernel": (512, 32),  # flatten of 4x4x32 (NHWC)
        "fc1/bias": (32,),
        "fc2/kernel": (32, 10),
        "fc2/bias": (10,),
    }


def test_resnet18_gn_layout():
    spec = build_spec("resnet18-gn", CIFAR, 10)
    shapes = param_shapes(spec)
    assert shapes["conv1/kernel"] == (7, 7, 3, 64)
    assert "conv1/bias" not in shapes  # torchvision convs have no bias
    assert shapes["gn1/scale"] == shapes["gn1/bias"] == (64,)
    assert shapes["layer2.0.conv1/kernel"] == (3, 3, 64, 128)
    assert shapes["layer2.0.down/kernel"] == (1, 1, 64, 128)
    assert "layer1.0.down/kernel" not in shapes  # identity shortcut where shapes already match
    assert shapes["layer4.1.conv2/kernel"] == (3, 3, 512, 512)
    assert shapes["fc/kernel"] == (512, 10) and shapes["fc/bias"] == (10,)
    assert not any(name.endswith("/bias") and name.split("/")[0].split(".")[-1].startswith("conv") for name in shapes)


def walk(layers):
    for layer in layers:
        yield layer
        if isinstance(layer, Residual):
            yield from walk(layer.body)
            yield from walk(layer.shortcut)


def test_resnet18_gn_uses_groupnorm_min_32_c():
    spec = build_spec("resnet18-gn", CIFAR, 10)
    shapes = param_shapes(spec)
    norms = [layer for layer in walk(spec.layers) if isinstance(layer, GroupNorm)]
    assert len(norms) == 1 + 8 * 2 + 3  # stem, two per block, three downsample norms
    for gn in norms:
        channels = shapes[f"{gn.name}/scale"][0]
        assert gn.groups == min(32, channels)
    assert sum(isinstance(layer, Residual) for layer in spec.layers) == 8


def test_cnn_tanh_variants():
    small = build_spec("cnn-tanh", MNIST, 10)
    assert param_shapes(small) == param_shapes(build_spec("cnn-mnist", MNIST, 10))
    assert {a.kind for a in small.layers if isinstance(a, Act)} == {"tanh"}
    assert {a.kind for a in build_spec("cnn-mnist", MNIST, 10).layers if isinstance(a, Act)} == {"relu"}

    big = build_spec("cnn-tanh", CIFAR, 10)
    convs = [layer for layer in big.layers if isinstance(layer, Conv)]
    assert [c.features for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel == 3 and c.padding == 1 and c.stride == 1 for c in convs)
    assert {a.kind for a in big.layers if isinstance(a, Act)} == {"tanh"}
    shapes = param_shapes(big)
    assert shapes["conv1/kernel"] == (3, 3, 3, 32)
    dense_layers = [layer for layer in big.layers if isinstance(layer, Dense)]
    assert shapes[f"{dense_layers[-1].name}/kernel"] == (2048, 10)


def test_build_spec_records_inputs():
    spec = build_spec("mlp", MNIST, 10)
    assert isinstance(spec, ModelSpec)
    assert (spec.name, spec.input_shape, spec.num_classes) == ("mlp", MNIST, 10)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("vgg16", MNIST),
        ("", MNIST),
        ("cnn-mnist", CIFAR),
        ("cnn-mnist", (8, 8, 1)),
        ("cnn-tanh", (8, 8, 1)),
        ("cnn-tanh", (64, 64, 3)),
        ("resnet18-gn", MNIST),
        ("resnet18-gn", (8, 8, 1)),
    ],
)
def test_build_spec_rejects(name, shape):
    with pytest.raises(ValueError):
        build_spec(name, shape, 10)


def test_zoo_names():
    assert set(MODELS) >= {"mlp", "cnn-mnist", "cnn-tanh", "resnet18-gn"}


# --------------------------------------------------------------------------- initialiser

ALL = [("mlp", MNIST), ("cnn-mnist", MNIST), ("cnn-tanh", CIFAR), ("resnet18-gn", CIFAR)]


@pytest.mark.parametrize("name, shape", ALL, ids=[a for a, _ in ALL])
def test_init_params_matches_param_shapes(name, shape):
    spec = build_spec(name, shape, 10)
    params = init_params(spec, 0)
    shapes = param_shapes(spec)
    assert list(params) == list(shapes)  # same names, same order
    for key, value in params.items():
        assert value.shape == shapes[key]
        assert value.dtype == np.float32
        assert np.all(np.isfinite(value))


@pytest.mark.parametrize("name, shape", ALL, ids=[a for a, _ in ALL])
def test_init_params_deterministic_per_seed(name, shape):
    spec = build_spec(name, shape, 10)
    a, b, c = init_params(spec, 3), init_params(spec, 3), init_params(spec, 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    random_keys = [k for k in a if not ("gn" in k.split("/")[0] and k.split("/")[1] in ("scale", "bias"))]
    assert random_keys
    for key in random_keys:
        assert not np.array_equal(a[key], c[key]), key


def test_init_is_torch_default_uniform_with_fan_in_bound():
    spec = build_spec("cnn-mnist", MNIST, 10)
    params = init_params(spec, 0)
    for layer, fan_in in (("conv1", 8 * 8 * 1), ("conv2", 4 * 4 * 16), ("fc1", 512), ("fc2", 32)):
        bound = 1 / math.sqrt(fan_in)
        for kind in ("kernel", "bias"):
            w = params[f"{layer}/{kind}"].astype(np.float64)
            assert np.abs(w).max() <= bound * (1 + 1e-6)
            if w.size >= 1_000:  # uniform(-b, b): mean 0, sd b / sqrt(3), max close to b
                sd = bound / math.sqrt(3)
                assert abs(w.mean()) < 5 * sd / math.sqrt(w.size)
                assert w.std() == pytest.approx(sd, rel=0.05)
                assert np.abs(w).max() > 0.95 * bound


def test_groupnorm_init_is_identity_affine():
    params = init_params(build_spec("resnet18-gn", CIFAR, 10), 1)
    gn_scales = [k for k in params if k.endswith("/scale")]
    assert gn_scales
    for key in gn_scales:
        np.testing.assert_array_equal(params[key], 1.0)
        np.testing.assert_array_equal(params[key.replace("/scale", "/bias")], 0.0)
