"""bench.spec: validation of every dataclass, derived quantities, serialisation and run_id."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from bench.spec import (
    DatasetSpec,
    DPConfig,
    OptimizerSpec,
    PerfFlags,
    RunSpec,
    SpecError,
    TrainConfig,
)


def make_run(**overrides) -> RunSpec:
    """A valid RunSpec (Fashion-MNIST-sized, Poisson, sigma 1.1); keyword arguments replace fields."""
    fields = {
        "suite": "s",
        "workload": "w",
        "dataset": DatasetSpec(name="fashion-mnist"),
        "model": "cnn-tanh",
        "train": TrainConfig(epochs=3, batch_size=256, optimizer=OptimizerSpec(name="sgd", learning_rate=0.5)),
        "dp": DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5),
        "backend": "jax",
        "variant": "vmap",
        "seed": 0,
        "perf": PerfFlags(threads=2),
        "dataset_size": 60_000,
    }
    fields.update(overrides)
    return RunSpec(**fields)


def raises_spec_error(path: str):
    return pytest.raises(SpecError, match=rf"^{path}: got ")


# --------------------------------------------------------------------------- SpecError


def test_spec_error_carries_path_value_expected_and_is_a_value_error():
    e = SpecError("train.epochs", "three", "a positive integer")
    assert isinstance(e, ValueError)
    assert (e.path, e.value, e.expected) == ("train.epochs", "three", "a positive integer")
    assert str(e) == "train.epochs: got 'three', expected a positive integer"


# --------------------------------------------------------------------------- DatasetSpec


def test_dataset_spec_defaults():
    ds = DatasetSpec(name="digits")
    assert ds.train_size is None and ds.test_size is None and ds.augment is False
    assert ds.shape is None and ds.num_classes is None


@pytest.mark.parametrize(
    "kwargs, path",
    [
        ({"name": ""}, "dataset.name"),
        ({"name": 3}, "dataset.name"),
        ({"name": "d", "train_size": 0}, "dataset.train_size"),
        ({"name": "d", "train_size": -5}, "dataset.train_size"),
        ({"name": "d", "train_size": 10.0}, "dataset.train_size"),
        ({"name": "d", "train_size": True}, "dataset.train_size"),
        ({"name": "d", "test_size": "100"}, "dataset.test_size"),
        ({"name": "d", "augment": "yes"}, "dataset.augment"),
        ({"name": "d", "augment": 1}, "dataset.augment"),
        ({"name": "d", "shape": (28, 28)}, "dataset.shape"),
        ({"name": "d", "shape": (28, 0, 1)}, "dataset.shape"),
        ({"name": "d", "shape": (28, 28.0, 1)}, "dataset.shape"),
        ({"name": "d", "num_classes": 1}, "dataset.num_classes"),
        ({"name": "d", "num_classes": 2.5}, "dataset.num_classes"),
    ],
)
def test_dataset_spec_rejects(kwargs, path):
    with raises_spec_error(path) as info:
        DatasetSpec(**kwargs)
    assert info.value.path == path


def test_dataset_spec_is_frozen_and_keyword_only():
    ds = DatasetSpec(name="synthetic", shape=(8, 8, 3), num_classes=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "mnist"  # type: ignore[misc]
    with pytest.raises(TypeError):
        DatasetSpec("synthetic")  # type: ignore[misc]


# --------------------------------------------------------------------------- OptimizerSpec


def test_optimizer_defaults_are_plain_sgd():
    opt = OptimizerSpec()
    assert opt.name == "sgd" and opt.momentum == 0.0 and opt.weight_decay == 0.0
    assert opt.learning_rate > 0


@pytest.mark.parametrize(
    "kwargs, path",
    [
        ({"name": "rmsprop"}, "optimizer.name"),
        ({"learning_rate": 0}, "optimizer.learning_rate"),
        ({"learning_rate": -0.1}, "optimizer.learning_rate"),
        ({"learning_rate": math.nan}, "optimizer.learning_rate"),
        ({"learning_rate": math.inf}, "optimizer.learning_rate"),
        ({"learning_rate": "0.1"}, "optimizer.learning_rate"),
        ({"learning_rate": True}, "optimizer.learning_rate"),
        ({"momentum": 1.0}, "optimizer.momentum"),
        ({"momentum": -0.1}, "optimizer.momentum"),
        ({"weight_decay": -1e-4}, "optimizer.weight_decay"),
        ({"beta1": 1.0}, "optimizer.beta1"),
        ({"beta2": -0.5}, "optimizer.beta2"),
        ({"eps": 0.0}, "optimizer.eps"),
        ({"name": "adam", "momentum": 0.9}, "optimizer.momentum"),
    ],
)
def test_optimizer_rejects(kwargs, path):
    with raises_spec_error(path):
        OptimizerSpec(**kwargs)


def test_optimizer_accepts_valid_settings():
    OptimizerSpec(name="sgd", learning_rate=4.0, momentum=0.9, weight_decay=5e-4)
    OptimizerSpec(name="adam", learning_rate=1e-3, beta1=0.0, beta2=0.99, eps=1e-6)


# --------------------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize(
    "kwargs, path",
    [
        ({"epochs": "three", "batch_size": 8}, "train.epochs"),
        ({"epochs": 0, "batch_size": 8}, "train.epochs"),
        ({"epochs": 2.0, "batch_size": 8}, "train.epochs"),
        ({"epochs": True, "batch_size": 8}, "train.epochs"),
        ({"epochs": 1, "batch_size": 0}, "train.batch_size"),
        ({"epochs": 1, "batch_size": None}, "train.batch_size"),
        ({"epochs": 1, "batch_size": 8, "eval_batch_size": -1}, "train.eval_batch_size"),
    ],
)
def test_train_config_rejects(kwargs, path):
    with raises_spec_error(path):
        TrainConfig(**kwargs)


def test_train_config_default_optimizer_is_a_fresh_default():
    a, b = TrainConfig(epochs=1, batch_size=8), TrainConfig(epochs=1, batch_size=8)
    assert a.optimizer == OptimizerSpec() and a == b


# --------------------------------------------------------------------------- DPConfig


@pytest.mark.parametrize(
    "kwargs, path",
    [
        ({"enabled": "yes", "noise_multiplier": 1.0}, "dp"),
        ({"noise_multiplier": 1.0, "sampling": "uniform"}, "sampling"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -1.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "delta": 0}, "delta"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "delta": 1.5}, "delta"),
        ({"noise_multiplier": 1.0, "delta": math.nan}, "delta"),
        ({}, "noise_multiplier"),  # enabled needs noise or a target
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"noise_multiplier": "1.0"}, "noise_multiplier"),
        ({"target_epsilon": 0}, "target_epsilon"),
        ({"target_epsilon": -3.0}, "target_epsilon"),
        ({"target_epsilon": math.nan}, "target_epsilon"),
        ({"enabled": False, "noise_multiplier": 1.0}, "noise_multiplier"),
        ({"enabled": False, "target_epsilon": 1.0}, "target_epsilon"),
    ],
)
def test_dp_config_rejects(kwargs, path):
    with raises_spec_error(path):
        DPConfig(**kwargs)


def test_dp_config_valid_settings():
    assert DPConfig(enabled=False).noise_multiplier is None
    assert DPConfig(noise_multiplier=0.0).noise_multiplier == 0.0  # sigma 0 is allowed (epsilon = inf)
    assert DPConfig(target_epsilon=3.0).sampling == "poisson"
    # The suite loader keeps both after calibration.
    both = DPConfig(noise_multiplier=0.9, target_epsilon=3.0)
    assert (both.noise_multiplier, both.target_epsilon) == (0.9, 3.0)
    assert DPConfig(noise_multiplier=1.0, sampling="shuffle").sampling == "shuffle"


# --------------------------------------------------------------------------- PerfFlags


@pytest.mark.parametrize(
    "kwargs, path",
    [({"threads": 0}, "threads"), ({"threads": "2"}, "threads"), ({"physical_batch_size": 0}, "physical_batch_size")],
)
def test_perf_flags_reject(kwargs, path):
    with raises_spec_error(path):
        PerfFlags(**kwargs)


# --------------------------------------------------------------------------- RunSpec validation


def test_run_spec_rejects_negative_seed_and_oversized_batch():
    with raises_spec_error("seed"):
        make_run(seed=-1)
    with raises_spec_error("train.batch_size"):
        make_run(train=TrainConfig(epochs=1, batch_size=101), dataset_size=100)
    make_run(train=TrainConfig(epochs=1, batch_size=100), dataset_size=100)  # B == N is fine


def test_run_spec_is_frozen_and_keyword_only():
    run = make_run()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        RunSpec("s", "w")  # type: ignore[misc]


# --------------------------------------------------------------------------- derived quantities


def test_sample_rate_is_batch_over_dataset_size():
    assert make_run().sample_rate == pytest.approx(256 / 60_000, rel=1e-15)


@pytest.mark.parametrize(
    "n, b, poisson_steps, shuffle_steps",
    [
        (60_000, 256, 234, 235),  # 1/q = 234.375
        (60_000, 240, 250, 250),  # exact
        (50_000, 512, 98, 98),  # 1/q = 97.66 -> 98
        (1_000, 300, 3, 4),  # 1/q = 3.33
        (1_000, 600, 2, 2),  # 1/q = 1.67
        (1_000, 1_000, 1, 1),  # full batch
    ],
)
def test_steps_per_epoch(n, b, poisson_steps, shuffle_steps):
    train = TrainConfig(epochs=7, batch_size=b)
    poisson = make_run(train=train, dataset_size=n)
    shuffle = make_run(train=train, dataset_size=n, dp=DPConfig(noise_multiplier=1.0, sampling="shuffle"))
    assert poisson.steps_per_epoch == poisson_steps == round(n / b)
    assert shuffle.steps_per_epoch == shuffle_steps == math.ceil(n / b)
    assert poisson.total_steps == 7 * poisson_steps
    assert shuffle.total_steps == 7 * shuffle_steps


def test_backend_label():
    assert make_run(backend="opacus", variant="ghost").backend_label == "opacus:ghost"
    assert make_run(backend="jax", variant="").backend_label == "jax"


# --------------------------------------------------------------------------- serialisation


def rich_run() -> RunSpec:
    return make_run(
        dataset=DatasetSpec(
            name="synthetic", train_size=5_000, test_size=500, augment=True, shape=(32, 32, 3), num_classes=5
        ),
        train=TrainConfig(
            epochs=2,
            batch_size=100,
            eval_batch_size=512,
            optimizer=OptimizerSpec(name="adam", learning_rate=1e-3, weight_decay=1e-4, beta2=0.99),
        ),
        dp=DPConfig(noise_multiplier=0.87, target_epsilon=3.0, max_grad_norm=0.1, delta=1e-6),
        perf=PerfFlags(threads=4, physical_batch_size=160),
        seed=7,
        dataset_size=5_000,
    )


def test_to_dict_from_dict_round_trip():
    run = rich_run()
    d = run.to_dict()
    assert isinstance(d["train"]["optimizer"], dict) and isinstance(d["dp"], dict)
    back = RunSpec.from_dict(d)
    assert back == run
    assert back.run_id == run.run_id


def test_round_trip_through_json():
    run = rich_run()
    back = RunSpec.from_dict(json.loads(json.dumps(run.to_dict())))
    assert back == run
    assert isinstance(back.dataset.shape, tuple)
    assert isinstance(back.train.optimizer, OptimizerSpec)
    assert back.run_id == run.run_id


def test_round_trip_of_non_private_run():
    run = make_run(dp=DPConfig(enabled=False))
    assert RunSpec.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_from_dict_validates():
    d = rich_run().to_dict()
    d["train"]["epochs"] = 0
    with raises_spec_error("train.epochs"):
        RunSpec.from_dict(d)


# --------------------------------------------------------------------------- run_id


def test_run_id_is_stable_short_hex():
    a, b = make_run(), make_run()
    assert a.run_id == b.run_id
    assert len(a.run_id) == 16 and all(c in "0123456789abcdef" for c in a.run_id)


@pytest.mark.parametrize(
    "overrides",
    [
        {"seed": 1},
        {"backend": "opacus"},
        {"variant": "other"},
        {"workload": "w2"},
        {"model": "cnn-mnist"},
        {"dataset": DatasetSpec(name="mnist")},
        {"dataset": DatasetSpec(name="fashion-mnist", augment=True)},
        {"dataset_size": 50_000},
        {"train": TrainConfig(epochs=4, batch_size=256, optimizer=OptimizerSpec(name="sgd", learning_rate=0.5))},
        {"train": TrainConfig(epochs=3, batch_size=512, optimizer=OptimizerSpec(name="sgd", learning_rate=0.5))},
        {"train": TrainConfig(epochs=3, batch_size=256, optimizer=OptimizerSpec(name="sgd", learning_rate=0.25))},
        {"dp": DPConfig(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5)},
        {"dp": DPConfig(noise_multiplier=1.1, max_grad_norm=0.5, delta=1e-5)},
        {"dp": DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-6)},
        {"dp": DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5, sampling="shuffle")},
        {"dp": DPConfig(enabled=False)},
        {"perf": PerfFlags(threads=8)},
    ],
)
def test_run_id_changes_with_what_determines_the_numbers(overrides):
    assert make_run(**overrides).run_id != make_run().run_id


@pytest.mark.parametrize(
    "overrides",
    [
        {"suite": "another-suite"},
        {"perf": PerfFlags(threads=2, physical_batch_size=512)},
        # The calibrated noise multiplier is what counts, not the target it came from.
        {"dp": DPConfig(noise_multiplier=1.1, target_epsilon=2.5, max_grad_norm=1.0, delta=1e-5)},
    ],
)
def test_run_id_ignores_suite_name_physical_batch_and_target(overrides):
    assert make_run(**overrides).run_id == make_run().run_id


def test_identity_does_not_mutate_the_spec():
    run = rich_run()
    _ = run.identity
    assert run.to_dict()["dp"]["target_epsilon"] == 3.0
    assert "suite" in run.to_dict() and "perf" in run.to_dict()


def test_run_id_does_not_depend_on_int_versus_float_spelling():
    as_int = make_run(dp=DPConfig(noise_multiplier=1, max_grad_norm=1, delta=1e-5))
    as_float = make_run(dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5))
    assert as_int == as_float  # the dataclasses already compare equal
    assert as_int.run_id == as_float.run_id
