"""Runner pieces that decide what a run's result says: statuses, rows, event parsing."""

from __future__ import annotations

import json
import math
import signal

import numpy as np

from bench.data.prepare import Dataset
from bench.runner import SHUFFLE_NOTE, _finish_status, build_rows, read_events
from bench.spec import DatasetSpec, DPConfig, RunSpec, TrainConfig
from bench.worker import BatchSource, classify_error, cross_entropy


def _run(**dp) -> RunSpec:
    return RunSpec(
        suite="s",
        workload="w",
        dataset=DatasetSpec(name="synthetic"),
        model="mlp",
        train=TrainConfig(epochs=2, batch_size=100),
        dp=DPConfig(**(dp or {"noise_multiplier": 1.0})),
        backend="jax",
        variant="vmap",
        dataset_size=1000,
    )


def _epoch(k: int) -> dict:
    return {
        "event": "epoch",
        "epoch": k,
        "steps": 10 * k,
        "examples": 1000,
        "train_loss": 1.0,
        "train_accuracy": 0.5,
        "test_loss": 1.0,
        "test_accuracy": 0.5,
        "train_seconds": 2.0,
        "epoch_seconds": 2.1,
        "physical_batch_size": 136,
        "peak_memory_mb": 100.0,
        "compilations": 1,
        "epsilon_reported": None,
    }


def test_read_events_waits_for_whole_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"event": "start"}) + "\n" + '{"event": "epo')
    events, offset = read_events(path)
    assert [e["event"] for e in events] == ["start"]
    with open(path, "a") as f:
        f.write('ch"}\n')
    more, _ = read_events(path, offset)
    assert [e["event"] for e in more] == ["epoch"]
    assert read_events(tmp_path / "missing.jsonl") == ([], 0)


def test_ok_without_all_epochs_is_not_ok():
    run = _run()
    status, error = _finish_status(run, [_epoch(1), {"event": "end", "status": "ok"}], 0, False)
    assert status == "failed" and "1 of 2 epochs" in error


def test_statuses_from_process_endings():
    run = _run()
    assert _finish_status(run, [_epoch(1)], None, True)[0] == "timeout"
    assert _finish_status(run, [], -signal.SIGKILL, False)[0] == "oom"
    assert _finish_status(run, [], -signal.SIGSEGV, False) == ("failed", "worker killed by SIGSEGV")
    status, error = _finish_status(run, [_epoch(1)], 0, False)
    assert status == "failed" and "without finishing" in error
    end = {"event": "end", "status": "diverged", "error": "non-finite"}
    assert _finish_status(run, [_epoch(1), end], 0, False) == ("diverged", "non-finite")


def test_error_classification():
    assert classify_error(MemoryError()) == "oom"
    assert classify_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")) == "oom"
    assert classify_error(ValueError("shapes do not match")) == "failed"


def test_rows_carry_epsilon_per_epoch_and_no_epsilon_without_dp():
    rows = build_rows(_run(), [_epoch(1), _epoch(2)], "ok", "", 0.0)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] <= rows[1]["epsilon_rdp"]
    assert rows[0]["examples_per_second"] == 500.0
    non_private = build_rows(_run(enabled=False), [_epoch(1)], "ok", "", 0.0)
    assert non_private[0]["epsilon"] is None and non_private[0]["noise_multiplier"] is None


def test_a_run_without_epochs_still_gets_a_row():
    rows = build_rows(_run(), [], "failed", "boom", 0.0)
    assert len(rows) == 1 and rows[0]["status"] == "failed" and rows[0]["error"] == "boom"


def test_shuffle_runs_are_marked():
    rows = build_rows(_run(noise_multiplier=1.0, sampling="shuffle"), [_epoch(1)], "ok", "", 0.0)
    assert rows[0]["accounting_note"] == SHUFFLE_NOTE
    assert build_rows(_run(), [_epoch(1)], "ok", "", 0.0)[0]["accounting_note"] == ""


def test_batch_source_pads_and_is_deterministic():
    rng = np.random.default_rng(0)
    data = Dataset(rng.normal(size=(1000, 4, 4, 1)).astype(np.float32), np.arange(1000) % 10, None, None, 10)
    source = BatchSource(_run(), data)
    x, y, mask = source.batch(3)
    assert x.shape[0] % source.physical == 0 and x.shape[0] == len(y) == len(mask)
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()
    assert not x[n:].any()
    x2, y2, mask2 = source.batch(3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and np.array_equal(mask, mask2)
    assert not np.array_equal(source.batch(4)[2], mask) or not np.array_equal(source.batch(4)[1], y)


def test_cross_entropy_matches_definition():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1000.0]])
    y = np.array([0, 2])
    expected0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(3)))
    np.testing.assert_allclose(cross_entropy(logits, y), [expected0, 0.0], atol=1e-12)
