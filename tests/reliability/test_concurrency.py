"""Concurrent use of one results folder: a lock per run_id, and readers that only ever see whole files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.results import RunLock, lock_path, read_results, read_status, result_path, write_rows
from bench.resultset import load_results

from .conftest import bench_env, events_of, small_run, suite_of, tiny_suite, wait_for

# Another `bench run` as far as the lock goes: holds a run's lock for 3 s, then writes its result or dies.
OTHER_RUN = """
import json, os, sys, time
from pathlib import Path
from bench.results import RunLock, write_rows
from bench.runner import build_rows
from bench.spec import RunSpec

lock_file, result, spec, write = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "write"
lock = RunLock(lock_file)
assert lock.acquire()
print("locked", flush=True)
time.sleep(3)
if write:
    write_rows(Path(result), build_rows(RunSpec.from_dict(json.loads(spec)), [], "ok", "", 0.0))
else:
    os.kill(os.getpid(), 9)  # dies mid-run, without a result
"""


def _other_bench_run(run, results: Path, write: bool) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            OTHER_RUN,
            str(lock_path(results, run.suite, run.run_id)),
            str(result_path(results, run.suite, run.run_id)),
            json.dumps(run.to_dict()),
            "write" if write else "die",
        ],
        env=bench_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_lock_is_exclusive_across_processes_and_released_when_its_holder_dies(tmp_path):
    path = lock_path(tmp_path, "s", "abc")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom bench.results import RunLock\n"
            "assert RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)",
            str(path),
        ],
        env=bench_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = RunLock(path)
        assert not lock.acquire()
        assert lock.holder() == f"pid {holder.pid}"
    finally:
        holder.kill()  # SIGKILL: no clean-up of any kind
        holder.wait()
    assert path.exists()  # the file stays; the lock went with the process
    with RunLock(path) as lock:
        assert lock.acquire()
        assert not RunLock(path).acquire()  # exclusive within one process too (separate descriptors)
    assert not (tmp_path / "s" / "abc.parquet").exists()


@pytest.mark.parametrize("other_writes", [True, False], ids=["other-finishes-it", "other-dies-without-result"])
def test_a_run_locked_by_another_bench_run_is_skipped_then_counted_or_run(fake_runner, tmp_path, other_writes):
    runner = fake_runner("train(2)\nfinish()")
    runs = [small_run(seed=s) for s in (0, 1, 2)]
    other = _other_bench_run(runs[1], runner.results_dir, write=other_writes)
    try:
        outcomes = runner.run_suite(suite_of(*runs))
    finally:
        other.wait(30)
    lines = "\n".join(runner.lines)
    assert (
        f"[2/3] skip w jax:bk non-private seed=1 ({runs[1].run_id}): running in another bench run (pid {other.pid}); skipped"
        in lines
    )
    deferred = re.search(r"\[2/3\] (ok|run) ", lines)
    assert deferred and lines.index("[3/3] run ") < deferred.start()  # the others first, then the locked one
    assert [o.status for o in outcomes] == ["ok", "ok", "ok"]
    assert [o.run for o in outcomes] == runs  # in suite order
    if other_writes:  # its result counts here, and no worker of ours ever ran it
        assert (
            outcomes[1].elsewhere
            and f"[2/3] ok w jax:bk non-private seed=1 ({runs[1].run_id}) (run by another bench run)" in lines
        )
        assert events_of(runner.results_dir, "rel", runs[1].run_id) == []
    else:  # the other process died without a result: this one ran it after all
        assert not outcomes[1].elsewhere and f"[2/3] run w jax:bk non-private seed=1 ({runs[1].run_id})" in lines
        assert events_of(runner.results_dir, "rel", runs[1].run_id)
    assert all(read_status(o.path) == "ok" for o in outcomes)


# A writer process that rewrites three result files, alternately 1 and 2,000 rows (~2 MB), as fast as it can.
WRITER = """
import sys, time
from pathlib import Path
from bench.results import write_rows

folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for run_id in ("a", "b", "c"):
        rows = 1 if n % 2 else 2000
        write_rows(folder / "s" / f"{run_id}.parquet",
                   [{"run_id": run_id, "suite": "s", "status": "ok", "epoch": k, "spec": "x" * 1000} for k in range(rows)])
    n += 1
print(n, flush=True)
"""


def test_readers_never_see_a_partial_result_file(tmp_path):
    folder = tmp_path / "results"
    for run_id in ("a", "b", "c"):
        write_rows(folder / "s" / f"{run_id}.parquet", [{"run_id": run_id, "suite": "s", "status": "ok", "epoch": 0}])
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder), "3"], env=bench_env(), stdout=subprocess.PIPE, text=True
    )
    reads, sizes = 0, set()
    while writer.poll() is None:
        loaded = load_results(folder)
        assert loaded.skipped == () and loaded.files == 3
        counts = loaded.frame.groupby("run_id").size().to_dict()
        assert set(counts) == {"a", "b", "c"} and set(counts.values()) <= {1, 2000}, counts
        sizes |= set(counts.values())
        table = read_results(folder)
        assert table.num_rows in {3, 2002, 4001, 6000}
        reads += 1
    rewrites = int(writer.stdout.read())
    assert writer.returncode == 0 and rewrites >= 2 and reads >= 5
    assert sizes == {1, 2000}  # the reader saw both versions: the reads did overlap the writes
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.integration
def test_two_bench_runs_on_one_results_folder(tmp_path, jax_env, bench_processes):
    """Two `bench run` of one suite into one folder, a reader reading it all along: every run executes exactly
    once, both sweeps end with every run's real status, and every read sees whole files."""
    suite_file, run_ids = tiny_suite(tmp_path, seeds=(0, 1, 2))
    results = tmp_path / "r"
    first = bench_processes("run", suite_file.name, "--results", "r", cwd=tmp_path, tag="first")
    wait_for(lambda: events_of(results, "tiny", run_ids[0]), 120, "the first sweep to start its first run")
    second = bench_processes("run", suite_file.name, "--results", "r", cwd=tmp_path, tag="second")

    reads, errors, stop = [0], [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                if (results / "tiny").exists() and list((results / "tiny").glob("*.parquet")):
                    loaded = load_results(results)
                    assert loaded.skipped == (), loaded.skipped
                    assert set(loaded.frame.status) == {"ok"}
                    reads[0] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
            time.sleep(0.02)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        codes = first.wait(), second.wait()
    finally:
        stop.set()
        thread.join()
    out1, out2 = first.output(), second.output()
    assert codes == (0, 0), out1 + out2
    assert errors == [] and reads[0] > 0

    both = out1 + out2
    for run_id in run_ids:  # executed exactly once, by one of the two
        assert len(re.findall(rf"\] run .*\({run_id}\)\n", both)) == 1, both
    # the second started while the first ran its first run: they met on at least one lock, and each names the
    # other (which runs they meet on depends on timing)
    met = {int(pid) for pid in re.findall(r"running in another bench run \(pid (\d+)\); skipped", out2)}
    met |= {-int(pid) for pid in re.findall(r"running in another bench run \(pid (\d+)\); skipped", out1)}
    assert met and met <= {first.pid, -second.pid}, both
    assert "3 runs: 3 ok" in out1 and "3 runs: 3 ok" in out2  # each speaks for every run, the other's included
    assert "run by another bench run on the same results folder" in both

    loaded = load_results(results)  # what reports read: the results, not the locks or logs
    assert loaded.files == 3 and loaded.skipped == ()
    assert sorted(loaded.frame.run_id.unique()) == sorted(run_ids)
    assert sorted(p.name for p in (results / "tiny" / "_locks").iterdir()) == sorted(f"{r}.lock" for r in run_ids)
    assert read_results(results).num_rows == 6  # 3 runs x 2 epochs
    for run_id in run_ids:
        assert pq.read_table(result_path(results, "tiny", run_id)).column("status").to_pylist() == ["ok", "ok"]
        assert RunLock(lock_path(results, "tiny", run_id)).acquire()  # nothing left locked
