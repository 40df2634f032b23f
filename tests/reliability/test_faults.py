"""Faults during a sweep: what each leaves behind, and that the next `bench run` carries on from there.

In-process Runner tests with fake workers cover the worker's endings (SIGKILL, a hang, exit 0 unfinished), a
full disk, stale files, a Ctrl-C, and an environment that fails to build (real pip, offline); real `bench run`
processes on the jax backend take the orchestrator's SIGKILL and Ctrl-C / SIGTERM with real signals.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import bench.results
from bench import cli
from bench.backend import _REGISTRY, BackendInfo
from bench.envs import env_dir, is_ready
from bench.results import RunLock, lock_path, read_results, read_status, result_path, write_rows
from bench.resultset import load_results
from bench.runner import Runner, SweepInterrupted, build_rows
from bench.spec import TrainConfig
from bench.suite import load_suite

from .conftest import alive, events_of, fake_python, small_run, suite_of, tiny_suite, wait_for


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted(Path(folder).rglob(pattern))


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- the worker's endings


def test_worker_killed_by_sigkill_keeps_its_epochs_and_the_sweep_goes_on(fake_runner):
    runner = fake_runner(
        """
if run["seed"] == 0:
    epoch(1)
    os.kill(os.getpid(), signal.SIGKILL)
train(2)
finish()
"""
    )
    killed, after = small_run(seed=0), small_run(seed=1)
    outcomes = runner.run_suite(suite_of(killed, after))
    assert [o.status for o in outcomes] == ["oom", "ok"]
    assert "worker killed by SIGKILL" in outcomes[0].error
    table = pq.read_table(outcomes[0].path).to_pandas()
    assert list(table.epoch) == [1] and set(table.status) == {"oom"}  # the finished epoch is kept
    assert read_status(outcomes[1].path) == "ok"
    assert _temp_files(runner.results_dir) == []


def test_hung_worker_and_its_children_are_stopped_at_the_timeout(fake_runner):
    runner = fake_runner(
        """
if run["seed"] == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    emit("child", pid=child.pid)
    epoch(1)
    time.sleep(600)
train(2)
finish()
"""
    )
    hung, after = small_run(seed=0), small_run(seed=1)
    t0 = time.monotonic()
    outcomes = runner.run_suite(suite_of(hung, after, timeout=2))
    assert time.monotonic() - t0 < 30
    assert [o.status for o in outcomes] == ["timeout", "ok"]
    assert "run exceeded its time limit after 1 of 2 epochs" in outcomes[0].error
    assert list(pq.read_table(outcomes[0].path).column("epoch").to_pylist()) == [1]
    events = events_of(runner.results_dir, "rel", hung.run_id)
    worker = next(e["pid"] for e in events if e["event"] == "start")
    child = next(e["pid"] for e in events if e["event"] == "child")
    wait_for(lambda: not alive(worker) and not alive(child), 10, "the hung worker and its child to be gone")


@pytest.mark.parametrize(
    "body, error",
    [
        ("epoch(1)\nsys.exit(0)", "worker exited with code 0 without finishing"),
        ("sys.exit(0)", "worker exited with code 0 without finishing"),
        ("epoch(1)\nfinish()", "worker reported ok after 1 of 2 epochs"),
    ],
    ids=["exit-0-after-one-epoch", "exit-0-at-once", "ok-after-one-epoch"],
)
def test_worker_that_ends_without_finishing_is_failed_not_ok(fake_runner, body, error):
    runner = fake_runner(body)
    (outcome,) = runner.run_suite(suite_of(small_run()))
    assert outcome.status == "failed" and error in outcome.error
    assert read_status(outcome.path) == "failed"
    # not final for --retry-failed, final otherwise
    assert runner.should_skip(small_run(), force=False, retry_failed=False) == "failed"
    assert runner.should_skip(small_run(), force=False, retry_failed=True) is None


# --------------------------------------------------------------------------- Ctrl-C, in process


def test_ctrl_c_in_the_runner_writes_the_partial_result_and_resume_reruns_it(fake_runner):
    raised = []

    def ctrl_c_after_first_epoch(run, event):
        if event["event"] == "epoch" and not raised:
            raised.append(run.run_id)
            raise KeyboardInterrupt

    first, second = small_run(seed=0), small_run(seed=1)
    runner = fake_runner("train(1)\ntime.sleep(600)", on_progress=ctrl_c_after_first_epoch)
    with pytest.raises(SweepInterrupted) as stopped:
        runner.run_suite(suite_of(first, second))
    assert stopped.value.outcomes == [] and stopped.value.current.run == first
    path = result_path(runner.results_dir, "rel", first.run_id)
    table = pq.read_table(path).to_pandas()
    assert set(table.status) == {"interrupted"} and list(table.epoch) == [1]
    assert not result_path(runner.results_dir, "rel", second.run_id).exists()
    worker = next(e["pid"] for e in events_of(runner.results_dir, "rel", first.run_id) if e["event"] == "start")
    wait_for(lambda: not alive(worker), 10, "the interrupted worker to be gone")

    # an interrupted run never finished: resuming (no --force, no --retry-failed) runs it again
    resumed = fake_runner("train(2)\nfinish()")
    outcomes = resumed.run_suite(suite_of(first, second))
    assert [(o.status, o.skipped) for o in outcomes] == [("ok", False), ("ok", False)]
    assert any(line.startswith("[1/2] run ") for line in resumed.lines)


# --------------------------------------------------------------------------- stale files of a killed sweep


def test_stale_temp_file_and_lock_file_do_not_block_the_run(fake_runner):
    runner = fake_runner("train(2)\nfinish()")
    run = small_run()
    path = result_path(runner.results_dir, "rel", run.run_id)
    path.parent.mkdir(parents=True)
    stale = path.with_name(f".{path.name}.99999999.tmp")
    stale.write_bytes(b"PAR1 half a file")  # what a writer killed mid-write leaves
    lock = lock_path(runner.results_dir, "rel", run.run_id)
    lock.parent.mkdir()
    lock.write_text("99999999 some-host\n")  # its holder is long dead: the kernel released its flock
    (outcome,) = runner.run_suite(suite_of(run))
    assert outcome.status == "ok" and read_status(path) == "ok"
    assert not stale.exists() and _temp_files(runner.results_dir) == []
    assert load_results(runner.results_dir).files == 1


# --------------------------------------------------------------------------- a disk that fills up


def test_disk_full_while_writing_leaves_no_partial_file_and_stops_the_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    suite_file, (first, second) = tiny_suite(tmp_path, seeds=(0, 1))
    runs = load_suite(suite_file).runs
    results = tmp_path / "r"
    path = result_path(results, "tiny", first)
    write_rows(path, build_rows(runs[0], [], "failed", "an earlier failure", 0.0))  # the previous result
    before = path.read_bytes()

    python = fake_python(tmp_path / "fake", "train(2)\nfinish()")
    monkeypatch.setattr(Runner, "python_for", lambda self, backend: str(python))
    real_write, attempts = pq.write_table, []

    def disk_full(table, where, **kwargs):
        buffer = io.BytesIO()
        real_write(table, buffer, **kwargs)
        data = buffer.getvalue()
        with open(where, "wb") as f:
            f.write(data[: len(data) // 2])  # some bytes made it, then the disk was full
        attempts.append(Path(where))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(bench.results.pq, "write_table", disk_full)
    code = cli.main(["run", str(suite_file), "--results", str(results), "--retry-failed"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"could not write the result of run {first} to {path}" in out and "No space left on device" in out
    assert "Free some space, then resume with: bench run" in out and "Traceback" not in out
    assert len(attempts) == 1 and not attempts[0].exists()  # the half-written temp file is gone
    assert path.read_bytes() == before  # the previous result is intact
    assert _temp_files(results) == [] and _files(results, "*.parquet") == [path]
    assert events_of(results, "tiny", second) == []  # the sweep stopped: no hours of training for nothing
    assert read_status(path) == "failed"

    monkeypatch.setattr(bench.results.pq, "write_table", real_write)  # space freed: resume
    assert cli.main(["run", str(suite_file), "--results", str(results), "--retry-failed"]) == 0
    assert set(read_results(results).to_pandas().status) == {"ok"}


# --------------------------------------------------------------------------- an environment that fails to build


@pytest.mark.integration
def test_environment_that_fails_to_build_fails_its_runs_and_the_others_run(tmp_path, monkeypatch, jax_env):
    """Real `python -m venv` and pip (offline) on a requirement that does not exist; jax runs for real."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("this-package-does-not-exist-dpbench==0\n")
    monkeypatch.setitem(_REGISTRY, "broken", BackendInfo("broken", "nowhere:Nothing", ("v",), str(requirements)))
    envs = tmp_path / "envs"
    envs.mkdir()
    (envs / "jax").symlink_to(env_dir("jax").resolve())
    monkeypatch.setenv("BENCH_ENVS_DIR", str(envs))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # fail at once, without the network
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines: list[str] = []
    runner = Runner(tmp_path / "results", log=lines.append)
    broken = [small_run(backend="broken", variant="v", seed=s) for s in (0, 1)]
    jax = small_run(train=TrainConfig(epochs=1, batch_size=50))
    outcomes = runner.run_suite(suite_of(broken[0], jax, broken[1], timeout=120))

    assert [o.status for o in outcomes] == ["failed", "ok", "failed"], [o.error for o in outcomes]
    for o in (outcomes[0], outcomes[2]):
        assert o.error.startswith("EnvError: creating the broken environment failed")
        assert "No matching distribution found for this-package-does-not-exist-dpbench" in o.error
        assert read_status(o.path) == "failed"
        assert "creating the broken environment failed" in pq.read_table(o.path).column("error")[0].as_py()
    assert "not tried again" in outcomes[2].error
    assert sum("creating the broken environment in" in line for line in lines) == 1  # pip ran once, not per run
    assert any(line.startswith("[1/3] failed ") and "broken environment failed" in line for line in lines)
    assert not is_ready("broken") and is_ready("jax")


# --------------------------------------------------------------------------- real `bench run` processes


def _after_an_epoch(results: Path, run_id: str) -> list[dict]:
    """The run's events once it has finished an epoch, else []."""
    events = events_of(results, "tiny", run_id)
    return events if any(e["event"] == "epoch" for e in events) else []


@pytest.mark.integration
def test_orchestrator_killed_with_sigkill_mid_sweep_then_resumed(tmp_path, jax_env, bench_processes):
    suite_file, (first, second) = tiny_suite(tmp_path, seeds=(0, 1), epochs=30, train_size=1024, batch_size=32)
    results = tmp_path / "r"
    sweep = bench_processes("run", suite_file.name, "--results", "r", cwd=tmp_path)
    events = wait_for(lambda: _after_an_epoch(results, second), 180, "the second run to finish an epoch")
    sweep.signal(signal.SIGKILL)  # the orchestrator's whole process group, as `kill -9 -PGID`
    sweep.wait(30)
    worker = next(e["pid"] for e in events if e["event"] == "start")
    wait_for(lambda: not alive(worker), 10, "the orphaned worker to die with its runner")
    after = events_of(results, "tiny", second)
    assert not any(e["event"] == "end" for e in after), "the worker trained on after its runner was killed"
    assert sum(e["event"] == "epoch" for e in after) < 30

    # left behind: the finished run's result, nothing at the unfinished run's path, no temp file,
    # lock files that block nobody (the kernel released them with the process)
    done = result_path(results, "tiny", first)
    assert read_status(done) == "ok"
    assert _files(results, "*.parquet") == [done]
    assert _temp_files(results) == []
    assert sorted(p.name for p in (results / "tiny" / "_locks").iterdir()) == sorted(
        f"{r}.lock" for r in (first, second)
    )
    with RunLock(lock_path(results, "tiny", second)) as lock:
        assert lock.acquire()
    stat = done.stat()

    resumed = bench_processes("run", suite_file.name, "--results", "r", cwd=tmp_path)
    assert resumed.wait() == 0, resumed.output()
    out = resumed.output()
    assert f"[1/2] skip synthetic-mlp jax:bk non-private seed=0 ({first}): already ok" in out
    assert f"[2/2] run synthetic-mlp jax:bk non-private seed=1 ({second})" in out
    assert "2 runs: 2 ok" in out
    assert (done.stat().st_ino, done.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not re-run
    df = read_results(results).to_pandas()
    assert set(df.status) == {"ok"} and df.groupby("run_id").epoch.max().to_dict() == {first: 30, second: 30}


@pytest.mark.integration
@pytest.mark.parametrize(
    "sig, code, reason",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")],
    ids=["SIGINT", "SIGTERM"],
)
def test_ctrl_c_stops_cleanly_and_resume_reruns_the_interrupted_run(
    tmp_path, jax_env, bench_processes, sig, code, reason
):
    # Long enough that the signal comes mid-run: jax:bk runs an epoch of this MLP in about 0.03 s.
    suite_file, (run_id,) = tiny_suite(tmp_path, epochs=300, train_size=1024, batch_size=32)
    results = tmp_path / "r"
    sweep = bench_processes("run", suite_file.name, "--results", "r", cwd=tmp_path)
    events = wait_for(lambda: _after_an_epoch(results, run_id), 180, "the run to finish an epoch")
    sweep.signal(sig)  # the process group, as a terminal's Ctrl-C
    assert sweep.wait(60) == code, sweep.output()
    out = sweep.output()
    path = result_path(results, "tiny", run_id)
    assert f"{reason}: 0 of 1 runs had ended" in out
    assert f"The run it stopped, {run_id}, is recorded as interrupted" in out
    assert "To resume (finished runs are skipped): bench run tiny.yaml --results r" in out
    assert "Traceback" not in out
    worker = next(e["pid"] for e in events if e["event"] == "start")
    wait_for(lambda: not alive(worker), 10, "the worker to be stopped")

    table = pq.read_table(path).to_pandas()  # the partial result: the epochs finished before the signal
    assert set(table.status) == {"interrupted"}
    assert 1 <= table.epoch.max() < 300 and table.test_accuracy.notna().all()
    assert _temp_files(results) == []

    resumed = bench_processes("run", suite_file.name, "--results", "r", cwd=tmp_path)
    assert resumed.wait() == 0, resumed.output()
    assert f"[1/1] run synthetic-mlp jax:bk non-private seed=0 ({run_id})" in resumed.output()
    table = pq.read_table(path).to_pandas()
    assert set(table.status) == {"ok"} and list(table.epoch) == list(range(1, 301))
