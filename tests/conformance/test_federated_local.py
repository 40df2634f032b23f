"""Federated local training (DP-FedAvg's client step), proven identical across backends.

One variant per installed backend (the variant does not matter for local training) plays the same clients as the
core's rounds do: set the global weights, train locally without DP on a padded (S, B) batching plan, read the
weights back. Against the JAX reference and against each backend's own centralized non-private steps, this checks
the client optimizer (sgd + momentum + L2, adam), a fresh optimizer state per client, that padded rows and
all-padding steps change nothing, that predict uses the weights set, the stats, and no recompilation per client.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from bench.backend import get_backend_info
from bench.models import build_spec, init_params
from bench.spec import FederatedConfig, PartitionSpec, RunSpec
from tests.conformance import harness as h

pytestmark = pytest.mark.conformance

BACKENDS = sorted({label.split(":")[0] for label in h.installed_labels()})
LABELS = [h.REFERENCE if name == "jax" else f"{name}:{get_backend_info(name).default_variant}" for name in BACKENDS]
OTHERS = [label for label in LABELS if label != h.REFERENCE]
MODELS = [("mlp", (28, 28, 1)), ("cnn-tanh", (28, 28, 1))]
MODEL_NAMES = [name for name, _ in MODELS]

# The same fp32 tolerances as test_conformance.py; runs of one backend on the same numbers must agree exactly
# up to reassociation.
LOGITS_TOL = dict(rtol=1e-4, atol=1e-5)
PARAMS_TOL = dict(rtol=1e-4, atol=2e-6)
SAME_TOL = dict(rtol=1e-6, atol=1e-7)
STATS_TOL = dict(rtol=1e-4, atol=1e-6)
ADAM_EPS = 1e-3  # well-conditioned, as in test_conformance.py

# A client's plan: full batch, an all-padding step (garbage rows), full batch, a last batch of REAL_ROWS rows.
PLAN_ROWS = (h.PHYSICAL, 0, h.PHYSICAL, h.REAL_ROWS)
EMPTY_STEP = 1
# The clients of a case, in order: (global weights, data). Client 3 repeats client 1 after another client (fresh
# optimizer state, set_params); 4 drops the all-padding step and 5 zeroes the padded rows (neither may change
# anything); 6 has no real rows at all.
CLIENTS = [("g1", "a"), ("g2", "b"), ("g1", "a"), ("g1", "a_noempty"), ("g1", "a_zero"), ("g2", "empty")]
ADAM_CLIENTS = CLIENTS[:3]


if h.REFERENCE not in LABELS:
    pytest.skip("the JAX reference environment is not installed (make setup)", allow_module_level=True)


def _plan(rng: np.random.Generator, shape: tuple[int, ...], rows: tuple[int, ...]) -> dict[str, np.ndarray]:
    """x (S, B, ...), y and mask (S, B) with `rows[s]` real rows in step s and garbage in the padding."""
    steps = len(rows)
    x = rng.normal(size=(steps, h.PHYSICAL, *shape)).astype(np.float32)
    mask = (np.arange(h.PHYSICAL) < np.array(rows)[:, None]).astype(np.float32)
    x[mask == 0] = rng.normal(scale=50.0, size=x[mask == 0].shape)
    y = rng.integers(0, h.NUM_CLASSES, size=(steps, h.PHYSICAL)).astype(np.int64)
    return {"x": x, "y": y, "mask": mask}


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Per model: two sets of global weights, the clients' plans, a logits input, and the plan's real steps."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for name, shape in MODELS:
        spec = build_spec(name, shape, h.NUM_CLASSES)
        for g in (1, 2):
            arrays.update({f"{name}/g{g}/{k}": np.asarray(v, np.float32) for k, v in init_params(spec, g).items()})
        a = _plan(rng, shape, PLAN_ROWS)
        keep = [s for s in range(len(PLAN_ROWS)) if s != EMPTY_STEP]
        plans = {
            "a": a,
            "a_noempty": {k: v[keep] for k, v in a.items()},
            "a_zero": {**a, "x": np.where(a["mask"].reshape(*a["mask"].shape, 1, 1, 1) > 0, a["x"], 0.0)},
            "b": _plan(rng, shape, (h.PHYSICAL, h.PHYSICAL)),
            "empty": _plan(rng, shape, (0,)),
        }
        for plan, data in plans.items():
            arrays.update({f"{name}/{plan}/{k}": v for k, v in data.items()})
        for k, s in enumerate(keep):  # the same batches as single centralized steps
            arrays.update({f"{name}/step{k}/{key}": v[s] for key, v in a.items()})
        arrays[f"{name}/logits_x"] = rng.normal(size=(16, *shape)).astype(np.float32)
    return arrays


def fed_run(label: str, model: str, **optimizer) -> RunSpec:
    """A federated run with DP on (which local training must ignore) and the given client optimizer."""
    run = h.with_optimizer(h.base_run(label, model, noise_multiplier=1.0, max_grad_norm=0.1), **optimizer)
    federated = FederatedConfig(partition=PartitionSpec(clients=10), rounds=1, clients_per_round=2, total_clients=10)
    return replace(run, train=replace(run.train, batch_size=h.PHYSICAL), federated=federated)


def _clients(name: str, clients: list[tuple[str, str]]) -> list[dict]:
    return [
        {
            "params": f"{name}/{g}",
            "x": f"{name}/{plan}/x",
            "y": f"{name}/{plan}/y",
            "mask": f"{name}/{plan}/mask",
            "logits": f"{name}/logits_x",
        }
        for g, plan in clients
    ]


def _cases(label: str) -> list[dict]:
    sgd = dict(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=1e-3)
    adam = dict(name="adam", learning_rate=1e-3, eps=ADAM_EPS, weight_decay=1e-3)
    cases = []
    for name, shape in MODELS:
        central = h.with_optimizer(replace(h.base_run(label, name, enabled=False), seed=1), **sgd)  # starts at g1
        steps = [{"x": f"{name}/step{k}/x", "y": f"{name}/step{k}/y", "mask": f"{name}/step{k}/mask"} for k in range(3)]
        cases += [
            h.case(f"{name}/sgd", fed_run(label, name, **sgd), shape, clients=_clients(name, CLIENTS)),
            h.case(f"{name}/central", central, shape, steps=steps),
        ]
    cases.append(h.case("mlp/adam", fed_run(label, "mlp", **adam), MODELS[0][1], clients=_clients("mlp", ADAM_CLIENTS)))
    backend, default = label.split(":")
    for variant in get_backend_info(backend).variants:
        if variant != default:
            run = fed_run(f"{backend}:{variant}", "mlp", **sgd)
            cases.append(h.case(f"mlp/variant-{variant}", run, MODELS[0][1], clients=_clients("mlp", CLIENTS[:2])))
    return cases


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """label -> (arrays, errors): one probe process per backend, two side by side."""
    workdir = tmp_path_factory.mktemp("federated")
    path = workdir / "inputs.npz"
    np.savez(path, **make_inputs())
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda label: h.run_probe(label, _cases(label), path, workdir), LABELS)
    return dict(zip(LABELS, results))


def _arrays(outputs, label: str, cid: str) -> dict[str, np.ndarray]:
    arrays, errors = outputs[label]
    if cid in errors:
        pytest.fail(f"{label} failed case {cid}: {errors[cid]}")
    return arrays


def _params(outputs, label: str, cid: str, client: int) -> dict[str, np.ndarray]:
    prefix = f"{cid}/client{client}/params/"
    return {k[len(prefix) :]: v for k, v in _arrays(outputs, label, cid).items() if k.startswith(prefix)}


def _get(outputs, label: str, cid: str, client: int, what: str) -> np.ndarray:
    return _arrays(outputs, label, cid)[f"{cid}/client{client}/{what}"]


def _global(name: str, g: str) -> dict[str, np.ndarray]:
    spec = build_spec(name, dict(MODELS)[name], h.NUM_CLASSES)
    return {k: np.asarray(v, np.float32) for k, v in init_params(spec, int(g[1:])).items()}


def _assert_params_close(actual: dict, expected: dict, what: str, tol: dict) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: parameter names differ"
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], err_msg=f"{what}: {name}", **tol)


def _expected_rows(plan: str) -> int:
    rows = {"a": sum(PLAN_ROWS), "a_noempty": sum(PLAN_ROWS), "a_zero": sum(PLAN_ROWS), "b": 2 * h.PHYSICAL}
    return rows.get(plan, 0)


CASES = [(f"{name}/sgd", k) for name in MODEL_NAMES for k in range(1, len(CLIENTS) + 1)]
CASES += [("mlp/adam", k) for k in range(1, len(ADAM_CLIENTS) + 1)]


@pytest.mark.parametrize(("cid", "client"), CASES)
@pytest.mark.parametrize("label", OTHERS)
def test_local_training_matches_reference(outputs, label, cid, client):
    """Weights after each client's local training, its stats, and the logits of the weights set before it."""
    what = f"{label} {cid} client {client}"
    expected = _params(outputs, h.REFERENCE, cid, client)
    _assert_params_close(_params(outputs, label, cid, client), expected, what, PARAMS_TOL)
    for key, tol in (("stats", STATS_TOL), ("logits", LOGITS_TOL)):
        actual, reference = (_get(outputs, lbl, cid, client, key) for lbl in (label, h.REFERENCE))
        np.testing.assert_allclose(actual, reference, err_msg=f"{what}: {key}", **tol)


@pytest.mark.parametrize("cid", ["mlp/sgd", "cnn-tanh/sgd", "mlp/adam"])
@pytest.mark.parametrize("label", LABELS)
def test_each_client_starts_afresh(outputs, label, cid):
    """Client 3 repeats client 1 after another client: set_params and a fresh optimizer state give the same."""
    _assert_params_close(_params(outputs, label, cid, 3), _params(outputs, label, cid, 1), f"{label} {cid}", SAME_TOL)
    np.testing.assert_array_equal(_get(outputs, label, cid, 3, "stats"), _get(outputs, label, cid, 1, "stats"))
    g1 = _global(cid.split("/")[0], "g1")
    assert all(not np.allclose(v, g1[k]) for k, v in _params(outputs, label, cid, 1).items()), "nothing trained"


@pytest.mark.parametrize("client", [4, 5], ids=["without-empty-step", "zero-padding"])
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("label", LABELS)
def test_padding_changes_nothing(outputs, label, model, client):
    """Dropping the all-padding step (momentum and L2 must not move the weights there) or zeroing the garbage
    in padded rows gives client 1's weights and stats."""
    cid = f"{model}/sgd"
    what = f"{label} {cid}: client {client} vs 1"
    _assert_params_close(_params(outputs, label, cid, client), _params(outputs, label, cid, 1), what, SAME_TOL)
    stats, first = (_get(outputs, label, cid, k, "stats") for k in (client, 1))
    np.testing.assert_allclose(stats, first, err_msg=what, **SAME_TOL)


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("label", LABELS)
def test_client_without_rows_changes_nothing(outputs, label, model):
    cid, last = f"{model}/sgd", len(CLIENTS)
    _assert_params_close(
        _params(outputs, label, cid, last), _global(model, "g2"), f"{label} {cid}", dict(rtol=0, atol=0)
    )
    np.testing.assert_array_equal(_get(outputs, label, cid, last, "stats"), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("label", LABELS)
def test_stats_count_real_rows(outputs, label, model):
    for k, (_, plan) in enumerate(CLIENTS, 1):
        assert _get(outputs, label, f"{model}/sgd", k, "stats")[2] == _expected_rows(plan), (label, model, k)


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("label", LABELS)
def test_local_training_is_centralized_non_private_training(outputs, label, model):
    """A client's local training equals the backend's (conformance-tested) non-private steps on its batches,
    from the same weights and optimizer: no clipping, no noise, whatever the run's DP settings say."""
    central = _arrays(outputs, label, f"{model}/central")
    prefix = f"{model}/central/step3/"
    expected = {k[len(prefix) :]: v for k, v in central.items() if k.startswith(prefix) and not k.endswith("/stats")}
    _assert_params_close(_params(outputs, label, f"{model}/sgd", 1), expected, f"{label} {model}", PARAMS_TOL)
    steps = np.array([central[f"{model}/central/step{k}/stats"] for k in (1, 2, 3)])
    rows = steps[:, 2]
    mean = [np.sum(steps[:, 0] * rows) / rows.sum(), np.sum(steps[:, 1] * rows) / rows.sum(), rows.sum()]
    np.testing.assert_allclose(_get(outputs, label, f"{model}/sgd", 1, "stats"), mean, **STATS_TOL)


@pytest.mark.parametrize("cid", ["mlp/sgd", "cnn-tanh/sgd", "mlp/adam"])
@pytest.mark.parametrize("label", LABELS)
def test_no_recompilation_per_client(outputs, label, cid):
    """Clients of 0, 2, 3 and 4 steps reuse one compiled step (where the backend counts compilations)."""
    clients = ADAM_CLIENTS if cid == "mlp/adam" else CLIENTS
    counts = [int(_get(outputs, label, cid, k, "compilations")) for k in range(1, len(clients) + 1)]
    if counts[0] < 0:
        pytest.skip(f"{label} does not count compilations")
    assert counts == [1] * len(counts), counts


@pytest.mark.parametrize("label", LABELS)
def test_every_variant_trains_alike(outputs, label):
    """Local training ignores the variant: every variant's build gives the default's weights."""
    backend, default = label.split(":")
    for variant in get_backend_info(backend).variants:
        if variant == default:
            continue
        for client in (1, 2):
            actual = _params(outputs, label, f"mlp/variant-{variant}", client)
            expected = _params(outputs, label, "mlp/sgd", client)
            _assert_params_close(actual, expected, f"{backend}:{variant} client {client}", PARAMS_TOL)
