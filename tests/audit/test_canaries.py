"""Canaries of the one-run audit and the suite's `audit:` block."""

from __future__ import annotations

import numpy as np
import pytest

from bench.audit.canaries import inclusion, training_size, with_canaries
from bench.data.prepare import Dataset
from bench.spec import AuditConfig, SpecError
from bench.suite import SuiteError, load_suite


def data(n: int = 500) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    return Dataset(x, rng.integers(0, 10, n), x[:50], rng.integers(0, 10, 50), 10)


@pytest.mark.parametrize("kind", ["noise", "mislabeled"])
def test_the_training_set_holds_the_included_canaries_and_its_size_is_known_in_advance(kind):
    audit = AuditConfig(canaries=100, guesses=20, kind=kind)
    enlarged, canaries = with_canaries(data(), audit, seed=3)
    assert len(enlarged.y_train) == training_size(500, audit, 3)
    assert canaries.included.sum() == len(enlarged.y_train) - (400 if kind == "mislabeled" else 500)
    tail = enlarged.x_train[-int(canaries.included.sum()) :]
    np.testing.assert_array_equal(tail, canaries.x[canaries.included])
    if kind == "mislabeled":  # every canary's label is wrong, and its original example left the training set
        rows = {r.tobytes() for r in enlarged.x_train[: -int(canaries.included.sum())]}
        assert not any(c.tobytes() in rows for c in canaries.x)


def test_inclusion_is_fair_seeded_and_independent_of_the_other_streams():
    bits = inclusion(0, 20_000)
    assert abs(bits.mean() - 0.5) < 0.02
    np.testing.assert_array_equal(bits, inclusion(0, 20_000))
    assert (bits != inclusion(1, 20_000)).any()
    # Poisson sampling draws from default_rng([seed, step]); the canary streams have a third entropy word.
    for step in (0xCA1A, 1, 2):
        assert ((np.random.default_rng([0, step]).random(1000) < 0.5) != inclusion(0, 1000)).any()


def test_audit_config_is_validated():
    with pytest.raises(SpecError, match="audit.guesses"):
        AuditConfig(canaries=10, guesses=11)
    with pytest.raises(SpecError, match="audit.kind"):
        AuditConfig(kind="images")
    with pytest.raises(SpecError, match="audit.canaries"):
        AuditConfig(canaries=1, guesses=1)


SUITE = """
name: s
workloads:
  - name: w
    dataset: {name: digits}
    model: mlp
    train: {epochs: 1, batch_size: 64}
    AUDIT
    privacy: [{dp: false}, {noise_multiplier: 1.0}]
"""


def test_suite_audit_block_sets_the_enlarged_size_per_seed_and_keeps_other_run_ids(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(SUITE.replace("AUDIT", "audit: {canaries: 200, guesses: 40}"))
    suite = load_suite(f, seeds=[0, 1])
    sizes = {r.seed: r.dataset_size for r in suite.runs}
    assert sizes == {s: training_size(1500, AuditConfig(canaries=200, guesses=40), s) for s in (0, 1)}
    assert all(r.audit == AuditConfig(canaries=200, guesses=40) for r in suite.runs)
    f.write_text(SUITE.replace("AUDIT", ""))
    plain = load_suite(f)
    assert all(r.audit is None for r in plain.runs)
    assert "audit" not in plain.runs[0].identity  # run_ids of workloads without an audit are unchanged


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ("audit: {canaries: 2000, kind: mislabeled}", "audit.canaries"),
        ("audit: {canaries: 100, guesses: 0}", "audit.guesses"),
        ("audit: {canary: 100}", "audit"),
        ("audit: 5", "audit"),
    ],
)
def test_bad_audit_blocks_name_the_field(tmp_path, block, field):
    f = tmp_path / "s.yaml"
    f.write_text(SUITE.replace("AUDIT", block))
    with pytest.raises(SuiteError, match=field):
        load_suite(f)


def test_runs_of_specs_without_the_audit_field_match_the_same_runs_with_it():
    """Baselines written before schema 3 have no `audit` in their spec; `bench compare` matches them all the same."""
    import json

    from bench.compare import config_key

    spec = json.loads(json.dumps(load_suite("ci").runs[0].to_dict()))
    assert spec["audit"] is None
    older = {k: v for k, v in spec.items() if k != "audit"}
    assert config_key(json.dumps(spec)) == config_key(json.dumps(older))
    audited = {**spec, "audit": {"canaries": 10, "guesses": 2, "kind": "noise"}}
    assert config_key(json.dumps(audited)) != config_key(json.dumps(spec))
