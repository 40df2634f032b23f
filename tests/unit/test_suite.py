"""bench.suite: YAML -> Suite -> RunSpecs; grid expansion, calibration, and errors that name file and field."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import backend as backend_module
from bench.accounting import epsilon
from bench.backend import BackendInfo
from bench.spec import DPConfig
from bench.suite import SUITES_DIR, SuiteError, load_suite


def base_suite() -> dict[str, Any]:
    """Two small workloads: 1 + 2 privacy settings on synthetic data, 1 setting on digits."""
    return {
        "name": "unit",
        "description": "unit-test suite",
        "backends": ["jax"],
        "seeds": [0],
        "threads": 3,
        "timeout": 120,
        "workloads": [
            {
                "name": "synth-mlp",
                "dataset": {"name": "synthetic", "train_size": 1000, "test_size": 200},
                "model": "mlp",
                "train": {"epochs": 2, "batch_size": 100, "optimizer": {"name": "sgd", "learning_rate": 0.1}},
                "dp": {"max_grad_norm": 1.0, "delta": 1.0e-5, "sampling": "poisson"},
                "privacy": [{"dp": False}, {"noise_multiplier": 1.0}, {"noise_multiplier": 2.0}],
            },
            {
                "name": "digits-mlp",
                "dataset": "digits",
                "model": "mlp",
                "train": {"epochs": 1, "batch_size": 50},
                "privacy": [{"noise_multiplier": 0.8}],
            },
        ],
    }


def write(tmp_path: Path, data: Any, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def expect_error(path: Path, field: str, **kwargs: Any) -> SuiteError:
    with pytest.raises(SuiteError) as info:
        load_suite(path, **kwargs)
    e = info.value
    assert e.file == str(path)
    assert str(path) in str(e)
    assert e.path == field, str(e)
    assert str(e).startswith(f"{path}: {field}: got "), str(e)
    assert "expected" in str(e)
    return e


@pytest.fixture
def two_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second registered backend with two variants (never imported: loading a suite only parses labels)."""
    monkeypatch.setitem(
        backend_module._REGISTRY,
        "fake",
        BackendInfo("fake", "nowhere:Fake", ("fast", "slow"), "backends/fake/requirements.txt"),
    )


# --------------------------------------------------------------------------- valid suites


def test_valid_suite_loads(tmp_path):
    path = write(tmp_path, base_suite())
    suite = load_suite(path)
    assert suite.name == "unit"
    assert suite.description == "unit-test suite"
    assert suite.path == path
    assert suite.timeout == 120.0
    assert suite.memory_limit_gb is None
    assert len(suite.runs) == 4  # (3 + 1 privacy settings) x 1 backend x 1 seed


@pytest.mark.parametrize("value", [12, 0.5])
def test_memory_limit_is_read(tmp_path, value):
    data = base_suite()
    data["memory_limit_gb"] = value
    suite = load_suite(write(tmp_path, data))
    assert suite.memory_limit_gb == float(value) and isinstance(suite.memory_limit_gb, float)


def test_grid_is_workloads_x_privacy_x_backends_x_seeds(tmp_path, two_backends):
    data = base_suite()
    data["backends"] = ["jax", "fake", "fake:slow"]
    data["seeds"] = [0, 1]
    suite = load_suite(write(tmp_path, data))
    assert len(suite.runs) == (3 + 1) * 3 * 2

    combos = [(r.workload, r.dp.enabled, r.dp.noise_multiplier, r.backend, r.variant, r.seed) for r in suite.runs]
    assert len(set(combos)) == len(combos)
    expected = set()
    for workload, settings in (("synth-mlp", [(False, None), (True, 1.0), (True, 2.0)]), ("digits-mlp", [(True, 0.8)])):
        for (enabled, sigma), (b, v), seed in itertools.product(
            settings, [("jax", "bk"), ("fake", "fast"), ("fake", "slow")], [0, 1]
        ):
            expected.add((workload, enabled, sigma, b, v, seed))
    assert set(combos) == expected
    assert len({r.run_id for r in suite.runs}) == len(suite.runs)


def test_runs_carry_the_workload_settings(tmp_path):
    suite = load_suite(write(tmp_path, base_suite()))
    synth = [r for r in suite.runs if r.workload == "synth-mlp"]
    digits = [r for r in suite.runs if r.workload == "digits-mlp"]
    for r in suite.runs:
        assert r.suite == "unit"
        assert r.perf.threads == 3
        assert (r.backend, r.variant, r.seed) == ("jax", "bk", 0)
    for r in synth:
        assert r.dataset.name == "synthetic" and r.dataset.train_size == 1000 and r.dataset.test_size == 200
        assert r.dataset_size == 1000
        assert r.model == "mlp"
        assert (r.train.epochs, r.train.batch_size) == (2, 100)
        assert r.train.optimizer.learning_rate == 0.1
        assert r.dp.max_grad_norm == 1.0 and r.dp.delta == 1e-5 and r.dp.sampling == "poisson"
        assert r.sample_rate == pytest.approx(0.1) and r.steps_per_epoch == 10 and r.total_steps == 20
    assert [r.dp.enabled for r in synth] == [False, True, True]
    assert [r.dp.noise_multiplier for r in synth] == [None, 1.0, 2.0]
    (d,) = digits
    assert d.dataset.name == "digits" and d.dataset_size == 1500  # the whole digits training split
    assert d.dp == DPConfig(noise_multiplier=0.8)  # dp section omitted -> defaults


def test_defaults_name_backends_seeds(tmp_path):
    data = base_suite()
    for key in ("name", "description", "backends", "seeds", "threads", "timeout"):
        data.pop(key)
    path = write(tmp_path, data, name="my-suite.yaml")
    suite = load_suite(path)
    assert suite.name == "my-suite"  # from the file name
    assert {(r.backend, r.seed) for r in suite.runs} == {("jax", 0)}
    assert suite.timeout > 0


def test_backends_and_seeds_overrides(tmp_path, two_backends):
    path = write(tmp_path, base_suite())
    suite = load_suite(path, backends="jax,fake:slow", seeds=[5, 6, 7])
    assert len(suite.runs) == 4 * 2 * 3
    assert {r.seed for r in suite.runs} == {5, 6, 7}
    assert {(r.backend, r.variant) for r in suite.runs} == {("jax", "bk"), ("fake", "slow")}
    assert len(load_suite(path, backends=["fake"]).runs) == 4
    assert {r.variant for r in load_suite(path, backends=["fake"]).runs} == {"fast"}  # default variant


def test_target_epsilon_is_calibrated(tmp_path):
    data = base_suite()
    data["workloads"][0]["privacy"] = [{"target_epsilon": 2.0}, {"target_epsilon": 4.0}]
    suite = load_suite(write(tmp_path, data))
    synth = [r for r in suite.runs if r.workload == "synth-mlp"]
    assert [r.dp.target_epsilon for r in synth] == [2.0, 4.0]
    sigmas = []
    for r in synth:
        sigma = r.dp.noise_multiplier
        assert isinstance(sigma, float) and sigma > 0
        eps = epsilon(sample_rate=r.sample_rate, noise_multiplier=sigma, steps=r.total_steps, delta=r.dp.delta).pld
        assert eps <= r.dp.target_epsilon
        assert eps >= 0.97 * r.dp.target_epsilon
        sigmas.append(sigma)
    assert sigmas[0] > sigmas[1]  # a smaller epsilon needs more noise


def test_calibration_uses_the_workloads_own_steps(tmp_path):
    """The same target over more epochs needs more noise."""
    data = base_suite()
    data["workloads"][0]["privacy"] = [{"target_epsilon": 2.0}]
    data["workloads"][1]["privacy"] = [{"target_epsilon": 2.0}]
    data["workloads"][1]["dataset"] = {"name": "synthetic", "train_size": 1000}
    data["workloads"][1]["train"] = {"epochs": 10, "batch_size": 100}
    short, long = load_suite(write(tmp_path, data)).runs
    assert (short.total_steps, long.total_steps) == (20, 100)
    assert long.dp.noise_multiplier > short.dp.noise_multiplier


def test_synthetic_shape_and_classes_are_used_for_the_model(tmp_path):
    data = base_suite()
    w = data["workloads"][0]
    w["dataset"] = {"name": "synthetic", "shape": [32, 32, 3], "num_classes": 4, "train_size": 1000}
    w["model"] = "resnet18-gn"
    suite = load_suite(write(tmp_path, data))
    r = suite.runs[0]
    assert r.dataset.shape == (32, 32, 3) and r.dataset.num_classes == 4


@pytest.mark.parametrize("path", sorted(SUITES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_suites_load(path):
    suite = load_suite(path, backends=["jax"])
    assert suite.runs
    assert suite.name == path.stem
    for r in suite.runs:
        assert r.backend == "jax"
        assert r.dataset_size > 0 and r.train.batch_size <= r.dataset_size
        if r.dp.enabled and r.federated is None:
            assert r.dp.noise_multiplier is not None and r.dp.noise_multiplier > 0
        if r.dp.enabled and r.federated is not None:  # noise 0: the tutorial's clipped, noiseless baseline
            assert r.dp.noise_multiplier is not None and r.dp.noise_multiplier >= 0
        if r.dp.target_epsilon is not None:
            eps = epsilon(
                sample_rate=r.sample_rate, noise_multiplier=r.dp.noise_multiplier, steps=r.total_steps, delta=r.dp.delta
            )
            assert eps.pld <= r.dp.target_epsilon
            if r.federated is None:  # federated calibration steps in whole clients, and may use RDP
                assert 0.97 * r.dp.target_epsilon <= eps.pld


def test_shipped_suite_by_name():
    assert load_suite("quickstart", backends=["jax"]).path == SUITES_DIR / "quickstart.yaml"


# --------------------------------------------------------------------------- errors

Mutate = Callable[[dict], None]


def w0(d: dict) -> dict:
    return d["workloads"][0]


def set_in(*keys: Any, value: Any) -> Mutate:
    def mutate(d: dict) -> None:
        target = d
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return mutate


def delete(*keys: Any) -> Mutate:
    def mutate(d: dict) -> None:
        target = d
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return mutate


W = ("workloads", 0)
ERROR_CASES: list[tuple[str, Mutate, str]] = [
    # unknown keys, at every level
    ("top-level key", set_in("bogus", value=1), "bogus"),
    ("workload key", set_in(*W, "optimiser", value={}), "workloads[0].optimiser"),
    ("dataset key", set_in(*W, "dataset", "size", value=10), "workloads[0].dataset.size"),
    ("train key", set_in(*W, "train", "epoch", value=3), "workloads[0].train.epoch"),
    ("optimizer key", set_in(*W, "train", "optimizer", "lr", value=0.1), "workloads[0].train.optimizer.lr"),
    ("dp key", set_in(*W, "dp", "noise", value=1.0), "workloads[0].dp.noise"),
    ("privacy key", set_in(*W, "privacy", 1, "sigma", value=1.0), "workloads[0].privacy[1].sigma"),
    ("perf key", set_in(*W, "perf", value={"threads": 4}), "workloads[0].perf.threads"),
    # missing required fields
    ("no workloads", delete("workloads"), "workloads"),
    ("empty workloads", set_in("workloads", value=[]), "workloads"),
    ("no train", delete(*W, "train"), "workloads[0].train"),
    ("no batch size", delete(*W, "train", "batch_size"), "workloads[0].train.batch_size"),
    ("no privacy", delete(*W, "privacy"), "workloads[0].privacy"),
    ("empty privacy", set_in(*W, "privacy", value=[]), "workloads[0].privacy"),
    # wrong types
    ("epochs string", set_in(*W, "train", "epochs", value="three"), "workloads[0].train.epochs"),
    ("epochs float", set_in(*W, "train", "epochs", value=2.5), "workloads[0].train.epochs"),
    ("batch string", set_in(*W, "train", "batch_size", value="big"), "workloads[0].train.batch_size"),
    (
        "lr string",
        set_in(*W, "train", "optimizer", "learning_rate", value="fast"),
        "workloads[0].train.optimizer.learning_rate",
    ),
    ("train not mapping", set_in(*W, "train", value=[1, 2]), "workloads[0].train"),
    ("workload not mapping", set_in("workloads", 0, value="w"), "workloads[0]"),
    ("workload name", set_in(*W, "name", value=""), "workloads[0].name"),
    ("privacy dp string", set_in(*W, "privacy", 0, "dp", value="no"), "workloads[0].privacy[0].dp"),
    (
        "noise string",
        set_in(*W, "privacy", 1, "noise_multiplier", value="high"),
        "workloads[0].privacy[1].noise_multiplier",
    ),
    ("seed bool", set_in("seeds", value=[0, True]), "seeds[1]"),
    ("seed negative", set_in("seeds", value=[-1]), "seeds[0]"),
    ("timeout", set_in("timeout", value=-5), "timeout"),
    ("memory limit negative", set_in("memory_limit_gb", value=-1), "memory_limit_gb"),
    ("memory limit zero", set_in("memory_limit_gb", value=0), "memory_limit_gb"),
    ("memory limit string", set_in("memory_limit_gb", value="lots"), "memory_limit_gb"),
    ("memory limit bool", set_in("memory_limit_gb", value=True), "memory_limit_gb"),
    ("suite name", set_in("name", value=""), "name"),
    # impossible values
    ("batch > synthetic train_size", set_in(*W, "train", "batch_size", value=1001), "workloads[0].train.batch_size"),
    (
        "batch > digits",
        lambda d: w0(d).update(dataset="digits", train={"epochs": 1, "batch_size": 1501}),
        "workloads[0].train.batch_size",
    ),
    (
        "batch > subset",
        lambda d: w0(d).update(
            dataset={"name": "fashion-mnist", "train_size": 500}, train={"epochs": 1, "batch_size": 600}
        ),
        "workloads[0].train.batch_size",
    ),
    (
        "train_size > fashion-mnist",
        set_in(*W, "dataset", value={"name": "fashion-mnist", "train_size": 60_001}),
        "workloads[0].dataset.train_size",
    ),
    (
        "test_size > digits",
        set_in(*W, "dataset", value={"name": "digits", "test_size": 298}),
        "workloads[0].dataset.test_size",
    ),
    ("train_size zero", set_in(*W, "dataset", "train_size", value=0), "workloads[0].dataset.train_size"),
    (
        "shape on a real dataset",
        set_in(*W, "dataset", value={"name": "digits", "shape": [8, 8, 1]}),
        "workloads[0].dataset.shape",
    ),
    ("unknown dataset", set_in(*W, "dataset", value="imagenet"), "workloads[0].dataset.name"),
    (
        "negative noise",
        set_in(*W, "privacy", 1, "noise_multiplier", value=-1.0),
        "workloads[0].privacy[1].noise_multiplier",
    ),
    ("zero target", set_in(*W, "privacy", 1, value={"target_epsilon": 0}), "workloads[0].privacy[1].target_epsilon"),
    (
        "unreachable target",
        lambda d: w0(d).update(train={"epochs": 50, "batch_size": 100}, privacy=[{"target_epsilon": 1e-6}]),
        "workloads[0].privacy[0].target_epsilon",
    ),
    (
        "noise and target",
        set_in(*W, "privacy", 1, value={"noise_multiplier": 1.0, "target_epsilon": 3.0}),
        "workloads[0].privacy[1]",
    ),
    ("neither noise nor target", set_in(*W, "privacy", 1, value={"dp": True}), "workloads[0].privacy[1]"),
    (
        "dp false with noise",
        set_in(*W, "privacy", 0, value={"dp": False, "noise_multiplier": 1.0}),
        "workloads[0].privacy[0]",
    ),
    (
        "target with shuffle",
        lambda d: (w0(d)["dp"].update(sampling="shuffle"), w0(d).update(privacy=[{"target_epsilon": 3.0}])),
        "workloads[0].privacy[0].target_epsilon",
    ),
    (
        "adam with momentum",
        set_in(*W, "train", "optimizer", value={"name": "adam", "momentum": 0.9}),
        "workloads[0].train.optimizer.momentum",
    ),
    ("unknown optimizer", set_in(*W, "train", "optimizer", "name", value="lbfgs"), "workloads[0].train.optimizer.name"),
    ("physical batch", set_in(*W, "perf", value={"physical_batch_size": 0}), "workloads[0].perf.physical_batch_size"),
    ("unknown backend", set_in("backends", value=["jax", "nope"]), "backends[1]"),
    ("unknown variant", set_in("backends", value=["jax:nope"]), "backends[0]"),
    ("empty backends", set_in("backends", value=[]), "backends"),
    ("unknown model", set_in(*W, "model", value="vgg16"), "workloads[0].model"),
    ("cnn-mnist on cifar10", lambda d: w0(d).update(dataset="cifar10", model="cnn-mnist"), "workloads[0].model"),
    ("cnn-tanh on digits", lambda d: w0(d).update(dataset="digits", model="cnn-tanh"), "workloads[0].model"),
    ("resnet on 28x28", set_in(*W, "model", value="resnet18-gn"), "workloads[0].model"),
    ("duplicate workload name", set_in("workloads", 1, "name", value="synth-mlp"), "workloads[1].name"),
    ("error in 2nd workload", set_in("workloads", 1, "train", "epochs", value=0), "workloads[1].train.epochs"),
]


@pytest.mark.parametrize("mutate, field", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_suite_raises_suite_error_naming_file_and_field(tmp_path, mutate, field):
    data = copy.deepcopy(base_suite())
    mutate(data)
    expect_error(write(tmp_path, data), field)


def test_error_message_shows_value_and_expectation(tmp_path):
    data = base_suite()
    w0(data)["train"]["epochs"] = "three"
    e = expect_error(write(tmp_path, data), "workloads[0].train.epochs")
    assert e.value == "three"
    assert "got 'three'" in str(e)
    assert "positive integer" in e.expected


def test_unknown_backend_override(tmp_path):
    expect_error(write(tmp_path, base_suite()), "backends[0]", backends=["nope"])
    expect_error(write(tmp_path, base_suite()), "backends[0]", backends="nope,jax")


def test_bad_seed_override(tmp_path):
    expect_error(write(tmp_path, base_suite()), "seeds[1]", seeds=[0, -3])


@pytest.mark.parametrize("key, value", [("delta", 1.0), ("delta", 0), ("max_grad_norm", -1.0), ("sampling", "uniform")])
def test_bad_dp_section_raises_suite_error(tmp_path, key, value):
    data = base_suite()
    w0(data)["dp"][key] = value
    path = write(tmp_path, data)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.file == str(path) and str(path) in str(info.value)
    assert info.value.path.startswith("workloads[0].") and info.value.path.endswith(f".{key}")


@pytest.mark.parametrize("key, value", [("delta", 1.0), ("max_grad_norm", -1.0), ("sampling", "uniform")])
def test_bad_dp_section_names_the_dp_field(tmp_path, key, value):
    data = base_suite()
    w0(data)["dp"][key] = value
    expect_error(write(tmp_path, data), f"workloads[0].dp.{key}")


def test_bad_memory_limit_message(tmp_path):
    data = base_suite()
    data["memory_limit_gb"] = -1
    path = write(tmp_path, data)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert str(info.value) == f"{path}: memory_limit_gb: got -1, expected a number > 0"


def test_bad_threads_raises_suite_error(tmp_path):
    data = base_suite()
    data["threads"] = 0
    path = write(tmp_path, data)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.file == str(path) and info.value.path.endswith("threads")


def test_bad_threads_names_the_top_level_field(tmp_path):
    data = base_suite()
    data["threads"] = 0
    expect_error(write(tmp_path, data), "threads")


@pytest.mark.parametrize(
    "text",
    ["workloads: [unclosed\n", "name: a\n  bad: indentation\n", "a: b: c\n", "workloads:\n\t- name: tab\n"],
)
def test_invalid_yaml(tmp_path, text):
    e = expect_error(write(tmp_path, text), "(yaml)")
    assert "valid YAML" in e.expected


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    expect_error(write(tmp_path, text), "(top level)")


def test_missing_file(tmp_path):
    path = tmp_path / "does-not-exist.yaml"
    e = expect_error(path, "(file)")
    assert "does-not-exist.yaml" in str(e)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nworkloads: []\n".encode("latin-1"))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.file == str(path) and str(path) in str(info.value)


def federated_suite() -> dict[str, Any]:
    """A small federated workload: 40 Dirichlet clients of the digits data, 3 rounds."""
    return {
        "name": "fed",
        "backends": ["jax"],
        "workloads": [
            {
                "name": "digits-fedavg",
                "dataset": "digits",
                "model": "mlp",
                "train": {"epochs": 1, "batch_size": 8, "optimizer": {"name": "sgd", "learning_rate": 0.01}},
                "federated": {
                    "partition": {"kind": "dirichlet", "clients": 40, "alpha": 0.5},
                    "rounds": 3,
                    "clients_per_round": 10,
                },
                "dp": {"max_grad_norm": 0.1, "delta": 1.0e-5},
                "privacy": [
                    {"dp": False},
                    {"noise_multiplier": 0.5},
                    {"noise_multiplier": 1.0, "clients_per_round": 20},
                ],
            }
        ],
    }


def test_federated_workload_has_user_level_sampling_and_defaults(tmp_path):
    runs = load_suite(write(tmp_path, federated_suite())).runs
    assert [r.federated.clients_per_round for r in runs] == [10, 10, 20]
    fed = runs[1].federated
    assert fed.total_clients == 40 and fed.rounds == 3
    assert runs[1].sample_rate == 10 / 40 and runs[1].total_steps == 3
    assert fed.server_optimizer.learning_rate == 1.0 and fed.server_optimizer.momentum == 0.9
    assert fed.adaptive_clipping.target_quantile == 0.5 and fed.adaptive_clipping.learning_rate == 0.2
    assert not runs[0].dp.enabled and runs[1].dp.noise_multiplier == 0.5
    assert len({r.run_id for r in runs}) == 3


def test_federated_fixed_clipping_and_target_epsilon_calibrates_noise(tmp_path):
    data = federated_suite()
    data["workloads"][0]["federated"]["adaptive_clipping"] = None
    data["workloads"][0]["privacy"] = [{"target_epsilon": 5.0}]
    (run,) = load_suite(write(tmp_path, data)).runs
    assert run.federated.adaptive_clipping is None
    eps = epsilon(sample_rate=0.25, noise_multiplier=run.dp.noise_multiplier, steps=3, delta=1e-5)
    assert eps.pld <= 5.0 + 1e-3
    assert epsilon(sample_rate=0.25, noise_multiplier=run.dp.noise_multiplier * 0.98, steps=3, delta=1e-5).pld > 5.0


def test_federated_noise_per_client_calibrates_clients_and_noise(tmp_path):
    data = federated_suite()
    data["workloads"][0]["privacy"] = [
        {"target_epsilon": 8.0, "noise_per_client": 0.1, "accountant": "rdp"},
        {"target_epsilon": 8.0, "noise_per_client": 0.1},
    ]
    rdp_run, pld_run = load_suite(write(tmp_path, data)).runs
    for run in (rdp_run, pld_run):
        m = run.federated.clients_per_round
        assert run.dp.noise_multiplier == pytest.approx(0.1 * m)
        assert run.dp.target_epsilon == 8.0
    assert pld_run.federated.clients_per_round <= rdp_run.federated.clients_per_round
    eps = epsilon(sample_rate=pld_run.sample_rate, noise_multiplier=pld_run.dp.noise_multiplier, steps=3, delta=1e-5)
    assert eps.pld <= 8.0 + 1e-6


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda w: w["federated"]["partition"].update(clients=5000), "workloads[0].federated.partition.clients"),
        (lambda w: w["federated"]["partition"].update(kind="writers"), "workloads[0].federated.partition.kind"),
        (lambda w: w["federated"].update(rounds=0), "workloads[0].federated.rounds"),
        (lambda w: w["federated"].update(clients_per_round=41), "workloads[0].federated.clients_per_round"),
        (lambda w: w["federated"].update(servers=1), "workloads[0].federated.servers"),
        (
            lambda w: w["federated"].update(adaptive_clipping={"target_quantile": 1.5}),
            "workloads[0].federated.adaptive_clipping.target_quantile",
        ),  # fmt: skip
        (lambda w: w["dp"].update(sampling="shuffle"), "workloads[0].dp.sampling"),
        (lambda w: w["privacy"].append({"noise_per_client": 0.1}), "workloads[0].privacy[3]"),
        (
            lambda w: w["privacy"].append({"target_epsilon": 2.0, "accountant": "gdp"}),
            "workloads[0].privacy[3].accountant",
        ),  # fmt: skip
        (
            lambda w: w["privacy"].append({"noise_multiplier": 1.0, "accountant": "rdp"}),
            "workloads[0].privacy[3].accountant",
        ),  # fmt: skip
    ],
)
def test_federated_errors_name_the_field(tmp_path, change, field):
    data = federated_suite()
    change(data["workloads"][0])
    expect_error(write(tmp_path, data), field)


def test_federated_only_privacy_keys_are_rejected_for_dp_sgd(tmp_path):
    data = base_suite()
    data["workloads"][0]["privacy"].append({"noise_multiplier": 1.0, "clients_per_round": 5})
    expect_error(write(tmp_path, data), "workloads[0].privacy[3].clients_per_round")


def test_client_ids_partition_counts_the_clients(tmp_path):
    import numpy as np

    ids = np.arange(1500) % 30
    np.save(tmp_path / "ids.npy", ids)
    data = federated_suite()
    data["workloads"][0]["federated"]["partition"] = {"kind": "client_ids", "file": str(tmp_path / "ids.npy")}
    assert load_suite(write(tmp_path, data)).runs[0].federated.total_clients == 30
    np.save(tmp_path / "ids.npy", ids[:100])
    expect_error(write(tmp_path, data), "workloads[0].federated.partition.file")


def test_federated_noise_that_adaptive_clipping_cannot_split_is_a_suite_error(tmp_path):
    data = federated_suite()
    data["workloads"][0]["privacy"] = [{"noise_multiplier": 1.2}]  # count stddev 10 / 20 = 0.5: z must be < 1
    e = expect_error(write(tmp_path, data), "workloads[0].privacy[0].noise_multiplier")
    assert "count_stddev" in str(e)
