"""Runner pieces that decide what a run's result says: statuses, rows, events, the memory watchdog, probes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.data.prepare import Dataset
from bench.memory import GIB, default_memory_limit_gb, process_tree, rss_bytes, tree_rss_bytes
from bench.results import STATUSES, read_status, result_path, write_rows
from bench.runner import (
    FINAL,
    SHUFFLE_NOTE,
    Outcome,
    ProbeResult,
    Runner,
    _finish_status,
    build_rows,
    probe_key,
    read_events,
)
from bench.spec import DatasetSpec, DPConfig, PerfFlags, RunSpec, TrainConfig
from bench.suite import Suite
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


# --------------------------------------------------------------------------- unsupported


def test_unsupported_is_a_final_status_that_retry_failed_keeps(tmp_path):
    assert "unsupported" in STATUSES and "unsupported" in FINAL
    runner = Runner(tmp_path)
    run = _run()
    write_rows(result_path(tmp_path, run.suite, run.run_id), build_rows(run, [], "unsupported", "no rule", 0.0))
    assert runner.should_skip(run, force=False, retry_failed=False) == "unsupported"
    assert runner.should_skip(run, force=False, retry_failed=True) == "unsupported"
    assert runner.should_skip(run, force=True, retry_failed=False) is None
    write_rows(result_path(tmp_path, run.suite, run.run_id), build_rows(run, [], "oom", "", 0.0))
    assert runner.should_skip(run, force=False, retry_failed=True) is None


def test_unsupported_ending_is_kept():
    end = {"event": "end", "status": "unsupported", "error": "Unsupported: no rule"}
    assert _finish_status(_run(), [end], 0, False) == ("unsupported", "Unsupported: no rule")


# --------------------------------------------------------------------------- memory


HOG = "import sys, time; hog = b'x' * (300 * 2**20); print('ready', flush=True); time.sleep(60)"


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_tree_rss_counts_the_workers_descendants():
    spawn_grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {HOG!r}])"
    proc = subprocess.Popen(
        [sys.executable, "-c", spawn_grandchild], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(process_tree(proc.pid)) == 2
        assert rss_bytes(proc.pid) < 100 * 2**20
        assert tree_rss_bytes(proc.pid) > 280 * 2**20
    finally:
        _stop(proc)
    deadline = time.monotonic() + 10
    while tree_rss_bytes(proc.pid) and time.monotonic() < deadline:  # SIGKILL takes effect asynchronously
        time.sleep(0.05)
    assert rss_bytes(proc.pid) == 0 and tree_rss_bytes(proc.pid) == 0


def test_default_memory_limit_is_most_of_the_machine():
    total_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    limit = default_memory_limit_gb()
    assert limit is not None and 0 < limit * GIB <= 0.9 * total_kb * 1024 + 1


def test_memory_limit_precedence(tmp_path):
    assert Runner(tmp_path).memory_limit_bytes() == pytest.approx(default_memory_limit_gb() * GIB)
    assert Runner(tmp_path, memory_limit_gb=2).memory_limit_bytes() == 2 * GIB
    assert Runner(tmp_path, memory_limit_gb=2).memory_limit_bytes(0.5) == 0.5 * GIB


@pytest.mark.parametrize("cli, suite_limit, expected", [(None, None, None), (None, 3.0, 3.0), (5.0, 3.0, 5.0)])
def test_run_suite_passes_the_command_line_or_suite_memory_limit(tmp_path, monkeypatch, cli, suite_limit, expected):
    run = _run()
    suite = Suite(name="s", path=tmp_path, description="", runs=(run,), timeout=10.0, memory_limit_gb=suite_limit)
    runner = Runner(tmp_path, memory_limit_gb=cli, log=lambda msg: None)
    calls = []
    monkeypatch.setattr(runner, "execute", lambda *args: calls.append(args) or _outcome(run))
    runner.run_suite(suite)
    assert calls == [(run, 10.0, expected)]


def _outcome(run: RunSpec) -> Outcome:
    return Outcome(run, "ok", "", Path("x"))


def test_over_memory_is_oom_whatever_the_events_say():
    status, error = _finish_status(_run(), [_epoch(1)], -signal.SIGKILL, False, "worker used 3.0 GiB, over ...")
    assert status == "oom" and error.startswith("worker used 3.0 GiB")


# --------------------------------------------------------------------------- fake workers

FAKE_WORKER = """
import json, os, subprocess, sys, time

job = json.load(open(sys.argv[-1]))
mode = os.environ["FAKE_WORKER"]


def emit(event, **fields):
    with open(job["events"], "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\\n")


emit("start", pid=os.getpid(), python="3.11")
if mode == "hog":
    hog = b"x" * (300 * 2**20)
    time.sleep(60)
elif mode == "child-hog":
    subprocess.run([sys.executable, "-c", "import time; hog = b'x' * (300 * 2**20); time.sleep(60)"])
elif mode == "sleep":
    time.sleep(60)
elif mode == "probe":
    assert job["max_steps"] == 3
    time.sleep(0.3)
    emit("built", seconds=0.1, versions={})
    emit("probe", build_seconds=0.1, first_step_seconds=2.0, step_seconds=0.25, steps=3)
    emit("end", status="ok", error="")
elif mode == "unsupported":
    emit("end", status="unsupported", error="Unsupported: no rule for this layer")
elif mode == "crash":
    print("segfault-ish", flush=True)
    sys.exit(3)
"""


def _small_run(**changes) -> RunSpec:
    run = RunSpec(
        suite="fake",
        workload="w",
        dataset=DatasetSpec(name="synthetic", train_size=200, test_size=40, shape=(4, 4, 1), num_classes=3),
        model="mlp",
        train=TrainConfig(epochs=2, batch_size=50),
        dp=DPConfig(noise_multiplier=1.0),
        backend="jax",
        variant="vmap",
        dataset_size=200,
    )
    return dataclasses.replace(run, **changes)


@pytest.fixture
def fake_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Runner whose "python" runs FAKE_WORKER (mode from $FAKE_WORKER) instead of bench.worker."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    python = tmp_path / "fake-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runner = Runner(tmp_path / "results", env="current", log=lambda msg: None)
    monkeypatch.setattr(runner, "python_for", lambda backend: str(python))

    def use(mode: str) -> Runner:
        monkeypatch.setenv("FAKE_WORKER", mode)
        return runner

    return use


@pytest.mark.parametrize("mode", ["hog", "child-hog"])
def test_watchdog_stops_a_worker_over_its_memory_limit(fake_runner, mode):
    run = _small_run()
    t0 = time.monotonic()
    outcome = fake_runner(mode).execute(run, timeout=60, memory_limit_gb=0.1)
    assert time.monotonic() - t0 < 30
    assert outcome.status == "oom", outcome.error
    assert outcome.error.startswith("worker used 0.")
    assert "over the memory limit of 0.1 GiB (set memory_limit_gb in the suite or --memory-limit)" in outcome.error
    assert read_status(outcome.path) == "oom"


def test_a_worker_under_its_limit_runs_to_its_timeout(fake_runner):
    outcome = fake_runner("sleep").execute(_small_run(), timeout=1, memory_limit_gb=1.0)
    assert outcome.status == "timeout" and read_status(outcome.path) == "timeout"


def test_a_crashed_worker_is_failed_with_its_log(fake_runner):
    outcome = fake_runner("crash").execute(_small_run(), timeout=30)
    assert outcome.status == "failed" and "code 3" in outcome.error and "segfault-ish" in outcome.error


def _parquet_files(runner: Runner) -> list[Path]:
    return sorted(runner.results_dir.rglob("*.parquet"))


def test_probe_reports_step_times_and_writes_no_result(fake_runner):
    runner = fake_runner("probe")
    result = runner.probe(_small_run(), steps=3, timeout=30)
    assert result.status == "ok", result.error
    assert (result.build_seconds, result.first_step_seconds, result.step_seconds) == (0.1, 2.0, 0.25)
    assert 0.1 <= result.startup_seconds < 10
    assert result.projected_seconds(9) == pytest.approx(result.startup_seconds + 2.0 + 8 * 0.25)
    assert _parquet_files(runner) == []
    assert list((runner.results_dir / "fake" / "_logs").glob("probe-*.log"))


@pytest.mark.parametrize(
    "mode, limits, status, text",
    [
        ("hog", (30, 0.1), "oom", "over the memory limit"),
        ("sleep", (1, None), "timeout", "no probe result within 1 s"),
        ("unsupported", (30, None), "unsupported", "no rule"),
        ("crash", (30, None), "failed", "segfault-ish"),
    ],
)
def test_probe_endings(fake_runner, mode, limits, status, text):
    runner = fake_runner(mode)
    result = runner.probe(_small_run(), steps=3, timeout=limits[0], memory_limit_gb=limits[1])
    assert result.status == status and text in result.error
    assert result.projected_seconds(100) is None
    assert _parquet_files(runner) == []


def test_projection_is_startup_first_step_and_the_rest_at_the_median():
    probe = ProbeResult("ok", "", build_seconds=1.0, first_step_seconds=3.0, step_seconds=0.5, startup_seconds=4.0)
    assert probe.projected_seconds(1) == 7.0
    assert probe.projected_seconds(101) == 57.0
    assert ProbeResult("ok", "", build_seconds=1.0, first_step_seconds=3.0, step_seconds=0.5).projected_seconds(1) == 4


def test_probe_key_ignores_privacy_level_and_seed():
    base = _run()
    same = [
        dataclasses.replace(base, seed=3),
        dataclasses.replace(base, dp=DPConfig(noise_multiplier=2.5)),
        dataclasses.replace(base, dp=DPConfig(target_epsilon=3.0, noise_multiplier=0.9)),
    ]
    assert {probe_key(r) for r in same} == {probe_key(base)}
    different = [
        dataclasses.replace(base, variant="other"),
        dataclasses.replace(base, dp=DPConfig(enabled=False)),
        dataclasses.replace(base, train=TrainConfig(epochs=2, batch_size=50)),
        dataclasses.replace(base, perf=PerfFlags(threads=4)),
        dataclasses.replace(base, model="cnn-tanh"),
        dataclasses.replace(base, workload="other"),
        dataclasses.replace(base, dataset=DatasetSpec(name="synthetic", train_size=500)),
    ]
    assert len({probe_key(r) for r in different} | {probe_key(base)}) == len(different) + 1


def _fed_run(**dp) -> RunSpec:
    from bench.spec import FederatedConfig, PartitionSpec

    fed = FederatedConfig(partition=PartitionSpec(clients=100), rounds=3, clients_per_round=10, total_clients=100)
    return dataclasses.replace(_run(**dp), federated=fed, train=TrainConfig(epochs=1, batch_size=8))


def _round(k: int, evaluated: bool = True) -> dict:
    return {
        "event": "round",
        "round": k,
        "sampled_clients": 9,
        "examples": 90,
        "train_loss": 1.0,
        "train_accuracy": 0.5,
        "test_loss": 1.0 if evaluated else None,
        "test_accuracy": 0.5 if evaluated else None,
        "clip_norm": 0.1,
        "unclipped_fraction": 0.4,
        "train_seconds": 0.3,
        "round_seconds": 0.4,
        "peak_memory_mb": 100.0,
    }


def test_federated_rows_are_per_round_with_user_level_epsilon():
    from bench.accounting import epsilon

    run = _fed_run(noise_multiplier=1.0)
    rows = build_rows(run, [_round(1, False), _round(2, False), _round(3)], "ok", "", 0.0)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["workload_kind"] == "federated" and r["clients_per_round"] == 10 for r in rows)
    assert rows[0]["test_accuracy"] is None and rows[2]["test_accuracy"] == 0.5
    assert rows[2]["sampled_clients"] == 9 and rows[2]["clip_norm"] == 0.1 and rows[2]["epoch_seconds"] == 0.4
    expected = epsilon(sample_rate=0.1, noise_multiplier=1.0, steps=3, delta=1e-5)
    assert rows[2]["epsilon"] == pytest.approx(expected.pld, rel=0.02)
    assert rows[2]["epsilon_rdp"] == pytest.approx(expected.rdp, rel=1e-6)
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert build_rows(_run(), [_epoch(1)], "ok", "", 0.0)[0]["workload_kind"] == "centralized"


def test_federated_run_short_of_its_rounds_is_not_ok():
    run = _fed_run(noise_multiplier=1.0)
    status, error = _finish_status(run, [_round(1), _round(2), {"event": "end", "status": "ok"}], 0, False)
    assert status == "failed" and "2 of 3 rounds" in error
    assert _finish_status(run, [_round(1), _round(2), _round(3), {"event": "end", "status": "ok"}], 0, False)[0] == "ok"
