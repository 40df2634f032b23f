"""Fuzzing `bench.suite.load_suite`: whatever a suite file holds, loading it ends in a valid Suite or a SuiteError
that names the file, never another exception; and YAML is loaded safely (no tag runs code).

Three kinds of input: arbitrary text, arbitrary YAML-able nested structures, and mutations of a valid suite with a
DP-SGD and a federated workload (keys deleted, inserted or given values of random types: huge numbers, NaN and
infinities, negatives, booleans for integers, lists for mappings, unicode, very long strings). The valid base uses
noise multipliers only, so no example pays for a target-epsilon calibration.
"""

from __future__ import annotations

import copy
import json
import math
import reprlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.results import result_path
from bench.spec import RunSpec
from bench.suite import Suite, SuiteError, load_suite

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID: dict[str, Any] = {
    "name": "fuzz",
    "description": "a valid base for mutations",
    "backends": ["jax"],
    "seeds": [0, 1],
    "threads": 1,
    "timeout": 60,
    "memory_limit_gb": 4,
    "workloads": [
        {
            "name": "sgd",
            "dataset": {"name": "synthetic", "train_size": 200, "test_size": 40, "shape": [4, 4, 1], "num_classes": 3},
            "model": "mlp",
            "train": {"epochs": 2, "batch_size": 50, "optimizer": {"name": "sgd", "learning_rate": 0.1}},
            "dp": {"max_grad_norm": 1.0, "delta": 1.0e-5, "sampling": "poisson"},
            "perf": {"physical_batch_size": 64},
            "privacy": [{"dp": False}, {"noise_multiplier": 1.0, "learning_rate": 0.2}],
        },
        {
            "name": "fedavg",
            "dataset": {"name": "synthetic", "train_size": 300, "test_size": 40, "shape": [4, 4, 1], "num_classes": 3},
            "model": "mlp",
            "train": {"epochs": 1, "batch_size": 4, "optimizer": {"name": "sgd", "learning_rate": 0.01}},
            "federated": {
                "partition": {"kind": "dirichlet", "clients": 30, "alpha": 0.5},
                "rounds": 3,
                "clients_per_round": 10,
                "server_optimizer": {"name": "sgd", "learning_rate": 1.0, "momentum": 0.9},
                "eval_every": 2,
                "adaptive_clipping": {"target_quantile": 0.5, "learning_rate": 0.2},
            },
            "dp": {"max_grad_norm": 0.1, "delta": 1.0e-5},
            "privacy": [{"dp": False}, {"noise_multiplier": 0.5}, {"noise_multiplier": 0.3, "clients_per_round": 12}],
        },
    ],
}

# Every key the loader knows, except those that start a (slow) calibration.
KEYS = sorted(
    {
        *("name", "description", "backends", "seeds", "threads", "timeout", "memory_limit_gb", "workloads"),
        *("dataset", "model", "train", "dp", "privacy", "perf", "federated"),
        *("train_size", "test_size", "augment", "shape", "num_classes"),
        *("epochs", "batch_size", "optimizer", "eval_batch_size", "learning_rate", "momentum", "weight_decay"),
        *("beta1", "beta2", "eps", "max_grad_norm", "delta", "sampling", "noise_multiplier", "physical_batch_size"),
        *("partition", "rounds", "clients_per_round", "server_optimizer", "eval_every", "adaptive_clipping"),
        *("kind", "clients", "alpha", "file", "target_quantile", "count_stddev", "accountant"),
    }
)
WORDS = ["poisson", "shuffle", "sgd", "adam", "dirichlet", "client_ids", "mlp", "cnn-tanh", "resnet18-gn"]
WORDS += ["synthetic", "digits", "cifar10", "jax", "jax:vmap", "opacus:ghost", "pld", "rdp", "", " ", "/dev/null"]

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 10**6, 2**31, 2**63, 2**64, 10**30, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e300, 1.7976931348623157e308, math.nan, math.inf, -math.inf]),
)
strings = st.one_of(
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.just("x" * 20_000),
    st.just("é☃𝔘\u202e\x00" * 50),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | strings, inner, max_size=4),
    max_leaves=10,
)

_DIR = Path(tempfile.mkdtemp(prefix="fuzz-suite-"))  # hypothesis examples share it (no function-scoped tmp_path)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(_DIR, ignore_errors=True)


def _check(path: Path) -> Suite | SuiteError:
    """Load `path`: a Suite of valid RunSpecs or a SuiteError naming the file; anything else fails the test."""
    try:
        suite = load_suite(path)
    except SuiteError as e:
        assert e.file == str(path) and str(path) in str(e)
        assert len(str(e)) < 5_000, "an error message must stay readable, whatever the value"
        return e
    assert isinstance(suite, Suite) and suite.runs
    assert isinstance(suite.name, str) and suite.name and isinstance(suite.description, str)
    assert math.isfinite(suite.timeout) and suite.timeout > 0
    results = _DIR / "results"
    for run in suite.runs:
        assert isinstance(run, RunSpec)
        blob = json.dumps(run.to_dict(), allow_nan=False)  # only finite numbers reach a worker
        assert RunSpec.from_dict(json.loads(blob)) == run  # what the worker rebuilds is the same run
        assert 0 < run.sample_rate <= 1 and run.total_steps >= 1
        assert results in result_path(results, run.suite, run.run_id).parents  # no suite name escapes the results
    return suite


def _write(text: str) -> Path:
    path = _DIR / "suite.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def test_the_base_suite_is_valid():
    suite = _check(_write(_dump(VALID)))
    assert isinstance(suite, Suite) and len(suite.runs) == 2 * 2 + 3 * 2
    assert {r.federated is not None for r in suite.runs} == {True, False}


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    _check(_write(text))


YAML_BITS = [
    "workloads:", "- ", "name: ", "{", "}", "[", "]", ": ", "\n", "  ", "&a ", "*a ", "!!str ", "!!int ", "!!float ",
    "!!binary ", "!!timestamp ", "!!bool ", "!!null ", "!!seq ", "!!map ", "!!set ", "!!omap ", "!custom ", "? ", "|", ">", "---\n", "...\n", "'", '"', "#",
    "2001-13-45", "2001-02-30 25:61:61", "1e400", ".nan", ".inf", "0x1F", "0o17", "1_000", "~", "null", "yes", "no",
    "<<: *a", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "\t", "\ufeff", "\x85", "\u2028",
]  # fmt: skip


@FUZZ
@given(st.lists(st.sampled_from(YAML_BITS) | st.text(max_size=5), max_size=40))
def test_yaml_looking_text(bits):
    _check(_write("".join(bits)))


@pytest.mark.parametrize(
    "text",
    [
        "a: 2001-13-45\n",  # a timestamp the resolver accepts and datetime rejects
        "workloads: [{train: {epochs: 2001-02-30}}]\n",
        "[" * 5000 + "]" * 5000,  # deeper than the composer's recursion
        "a: &a [" + "*a, " * 3 + "]\n",
        "a: &a [x]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\nd: &d [*c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d]\nf: &f [*e, *e, *e, *e]\ng: &g [*f, *f, *f, *f]\nh: [*g, *g, *g, *g]\n",  # laughs
        "workloads:\n- &w {name: w, dataset: synthetic, model: mlp, train: {epochs: 1, batch_size: 10},"
        " privacy: [{dp: false}]}\n- *w\n",  # the same workload twice through an alias
        "workloads: [{name: w, dataset: synthetic, model: mlp, train: {epochs: 1, batch_size: 10},"
        " privacy: &p [{dp: false}, *p]}]\n",  # a recursive list
        f"seeds: {list(range(1000))}\nworkloads: [{{name: w, dataset: synthetic, model: mlp,"
        f" train: {{epochs: 1, batch_size: 10}}, privacy: [&p {{dp: false}}{', *p' * 999}]}}]\n",  # a 10**6 grid
        "\ufeffworkloads: []\n",
        "name: !!binary aGVsbG8=\nworkloads: []\n",
        "? [a, b]\n: c\n",
        "workloads: !!set {a, b}\n",
    ],
)
def test_awkward_yaml(text):
    _check(_write(text))


@FUZZ
@given(values)
def test_arbitrary_structures(data):
    _check(_write(_dump(data)))


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_arbitrary_top_level_mappings(data):
    _check(_write(_dump({**data, "workloads": data.get("workloads", [])})))


def _slots(node: Any, found: list) -> list:
    """Every (container, key) in the tree: the places a mutation can act on."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in list(items):
        found.append((node, key))
        _slots(child, found)
    return found


@st.composite
def mutated(draw: st.DrawFn) -> dict:
    suite = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(suite, [])
        if not slots:
            break
        node, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(["delete", "replace", "insert", "listify", "swap"]))
        if op == "delete":
            del node[key]
        elif op == "replace":
            node[key] = draw(values)
        elif op == "insert" and isinstance(node, dict):
            node[draw(st.sampled_from(KEYS) | strings)] = draw(values)
        elif op == "insert":
            node.insert(key, draw(values))
        elif op == "listify":  # a list where a mapping was, or the other way round
            old = node[key]
            node[key] = list(old.values()) if isinstance(old, dict) else {"x": old} if isinstance(old, list) else [old]
        else:  # another slot's value here
            other_node, other_key = draw(st.sampled_from(slots))
            node[key] = copy.deepcopy(other_node[other_key])
    return suite


@FUZZ
@given(mutated())
def test_mutated_valid_suites(data):
    _check(_write(_dump(data)))


OPTIONAL = ("count_stddev", "memory_limit_gb", "train_size")


@pytest.mark.parametrize(
    "value",
    [
        True, 2.0, 10**400, -(10**400), math.nan, math.inf, -3, "3", [3], {"n": 3}, None, 2**63, 1e300,
    ],
    ids=lambda v: reprlib.repr(v)[:20],
)  # fmt: skip
@pytest.mark.parametrize(
    "where",
    [
        ("workloads", 0, "train", "epochs"),
        ("workloads", 0, "train", "optimizer", "learning_rate"),
        ("workloads", 0, "dp", "delta"),
        ("workloads", 0, "dp", "max_grad_norm"),
        ("workloads", 0, "privacy", 1, "noise_multiplier"),
        ("workloads", 0, "dataset", "train_size"),
        ("workloads", 0, "dataset", "shape", 0),
        ("workloads", 1, "federated", "rounds"),
        ("workloads", 1, "federated", "partition", "alpha"),
        ("workloads", 1, "federated", "adaptive_clipping", "count_stddev"),
        ("workloads", 1, "privacy", 1, "noise_multiplier"),
        ("timeout",),
        ("memory_limit_gb",),
        ("threads",),
        ("seeds", 0),
    ],
)
def test_edge_values_in_every_numeric_field(where, value):
    data = copy.deepcopy(VALID)
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    result = _check(_write(_dump(data)))
    never = value is True or isinstance(value, str | list | dict) or (value is None and where[-1] not in OPTIONAL)
    never = never or (isinstance(value, int | float) and not 0 < value < 10**301)  # NaN too: no comparison holds
    if never:
        assert isinstance(result, SuiteError), f"{value!r} accepted at {where}"


# --------------------------------------------------------------------------- YAML safety


@pytest.mark.parametrize(
    "tag",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        '!!python/object/apply:subprocess.call [["touch", "{marker}"]]',
        '!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
        "!!python/name:os.system",
        "!!python/module:os",
        '!!python/object:__main__.Evil {{"x": 1}}',
        "!!python/object/apply:builtins.exec [\"open('{marker}', 'w')\"]",
    ],
)
@pytest.mark.parametrize("where", ["top", "name", "workload"])
def test_python_tags_are_refused_and_nothing_runs(tmp_path, tag, where):
    marker = tmp_path / "pwned"
    value = tag.format(marker=marker)
    text = {
        "top": f"{value}\n",
        "name": f"name: {value}\nworkloads: []\n",
        "workload": "workloads:\n  - name: w\n    dataset: synthetic\n    model: mlp\n"
        f"    train: {{epochs: 1, batch_size: 10}}\n    privacy: [{{dp: false}}]\n    perf: {value}\n",
    }[where]
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.path == "(yaml)" and str(path) in str(info.value)
    assert not marker.exists()


def test_a_pickled_partition_file_is_refused_and_not_run(tmp_path):
    """The one file a suite names (a federated partition) is read with numpy, pickles refused."""
    import numpy as np

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([Evil()] * 300, dtype=object), allow_pickle=True)
    marker.unlink(missing_ok=True)
    data = copy.deepcopy(VALID)
    data["workloads"][1]["federated"]["partition"] = {"kind": "client_ids", "file": str(ids)}
    path = tmp_path / "suite.yaml"
    path.write_text(_dump(data))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.path == "workloads[1].federated.partition.file"
    assert not marker.exists()


def test_federated_workloads_refuse_shuffle_sampling(tmp_path):
    """User-level epsilon is accounted for Poisson sampling of clients: a federated workload cannot shuffle."""
    data = copy.deepcopy(VALID)
    data["workloads"][1]["dp"]["sampling"] = "shuffle"
    path = tmp_path / "suite.yaml"
    path.write_text(_dump(data))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.path == "workloads[1].dp.sampling"


def test_a_calibration_the_accountant_cannot_do_is_a_suite_error(tmp_path):
    """2**62 steps of a 2**-62 sampling rate: dp-accounting's PLD grid would take petabytes. A SuiteError says so."""
    data = copy.deepcopy(VALID)
    workload = data["workloads"][0]
    workload["dataset"]["train_size"] = 2**62
    workload["train"]["batch_size"] = 1
    workload["privacy"] = [{"target_epsilon": 1.0}]
    path = tmp_path / "suite.yaml"
    path.write_text(_dump(data))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.path == "workloads[0].privacy[0].target_epsilon" and "accountant failed" in str(info.value)
