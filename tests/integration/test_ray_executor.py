"""`bench run --executor ray` on a real Ray cluster: a head and worker nodes started here on 127.0.0.1, torn down
after. The rows equal the local executor's; a node killed mid-sweep costs a retry, not a result; retries are
bounded; a killed driver leaves no worker behind and resumes; no run ever executes twice at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from bench.results import read_results
from bench.suite import load_suite

pytest.importorskip("ray")

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")
BENCH = [sys.executable, "-m", "bench"]
ROOT = Path(__file__).resolve().parents[2]

SUITE = """
name: {name}
description: "Ray executor test"
backends: [jax, opacus]
seeds: [0]
threads: 1
timeout: 300
workloads:
  - name: synthetic-mlp
    dataset: {{name: synthetic, train_size: 512, test_size: 64, shape: [4, 4, 1], num_classes: 4}}
    model: mlp
    train:
      epochs: {epochs}
      batch_size: 64
      optimizer: {{name: sgd, learning_rate: 0.1}}
    dp: {{max_grad_norm: 1.0, delta: 1.0e-5}}
    privacy:
      - dp: false
      - noise_multiplier: 1.0
"""

# The GCS declares a silent node dead after about 1.5 s instead of Ray's default 30 s.
FAST_HEALTH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "0",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict | None = None) -> None:
    subprocess.run([RAY, *args], check=True, capture_output=True, text=True, timeout=120, env=env)


def _raylets() -> dict[int, str]:
    """pid -> static resource list of every raylet on this machine."""
    found = {}
    for pid in _pids():
        cmd = _cmdline(pid)
        if cmd and cmd[0].endswith("/raylet"):
            found[pid] = next((a for a in cmd if a.startswith("--static_resource_list=")), "")
    return found


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


def bench_workers() -> dict[int, str]:
    """pid -> run_id of every `bench.worker` process on this machine (the job file is named after the run)."""
    return {pid: Path(job).name.split(".")[0] for pid, job in _worker_jobs().items()}


def _worker_jobs() -> dict[int, str]:
    """pid -> job file of every `bench.worker` process that a Ray task started on this machine. A Ray task's job file
    is in its own `dpbench-<run_id>-` temporary folder; workers of other tests running beside these (pytest-xdist)
    keep theirs under their results folder, and are not counted."""
    found = {}
    for pid in _pids():
        cmd = [a for a in _cmdline(pid) if a]
        if "bench.worker" in cmd and Path(cmd[-1]).parent.name.startswith("dpbench-"):
            found[pid] = cmd[-1]
    return found


def _training(pid: int, job: str) -> bool:
    """The worker has finished an epoch (its events file, beside its job file, says so)."""
    try:
        return '"event": "epoch"' in Path(job.replace(".job.json", ".events.jsonl")).read_text()
    except OSError:
        return False


class Cluster:
    """A Ray head on 127.0.0.1 with one CPU, and extra nodes each tagged with a resource of its own name."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **FAST_HEALTH, "RAY_USAGE_STATS_ENABLED": "0"}
        _ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp}",
            env=self.env,
        )

    def add_node(self, name: str, *options: str, env: dict[str, str] | None = None) -> int:
        """Start a worker node (one CPU unless `options` say otherwise) whose processes see `env` on top of this
        one's; returns its raylet's pid."""
        before = set(_raylets())
        _ray(
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            *(options if any(o.startswith("--num-cpus") for o in options) else ("--num-cpus=1", *options)),
            f"--resources={json.dumps({name: 1})}",
            env={**self.env, **(env or {})},
        )
        (pid,) = [p for p, res in _raylets().items() if p not in before and f"{name},1" in res]
        return pid

    def kill_node(self, raylet: int) -> list[int]:
        """A node dies: SIGKILL its raylet and Ray's processes under it. The `bench.worker` under them is left
        to die by itself (it must: PR_SET_PDEATHSIG). Returns the bench.worker pids that were running there."""
        workers = [p for p in bench_workers() if _descends_from(p, raylet)]
        for pid in [p for p in _pids() if _descends_from(p, raylet) and p not in workers] + [raylet]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return workers

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=self.env)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if subprocess.run([RAY, "status"], capture_output=True, timeout=60).returncode == 0:
        pytest.fail("a Ray cluster already runs on this machine; `ray stop` it first (these tests stop theirs)")
    c = Cluster()
    try:
        c.add_node("second")
        yield c
    finally:
        c.stop()


def write_suite(folder: Path, name: str, epochs: int = 2, **changes: str) -> Path:
    """The 4-run suite (jax and opacus, non-private and sigma 1), or with `backends`, `seeds`, `privacy` or
    `threads` replaced (YAML flow text)."""
    text = SUITE.format(name=name, epochs=epochs)
    for key, value in changes.items():
        lines = text.splitlines()
        (i,) = [k for k, line in enumerate(lines) if line.lstrip().startswith(f"{key}:")]
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        end = i + 1
        while key == "privacy" and end < len(lines) and lines[end].lstrip().startswith("-"):
            end += 1
        lines[i:end] = [f"{indent}{key}: {value}"]
        text = "\n".join(lines) + "\n"
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def bench(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([*BENCH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def start_bench(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = open(cwd / "bench.out", "w")  # noqa: SIM115 - closed with the process by the caller's wait
    return subprocess.Popen([*BENCH, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)


def rows(results: Path):
    return read_results(results).to_pandas().sort_values(["run_id", "epoch"]).reset_index(drop=True)


class Overlap:
    """Samples the machine's bench.worker processes while a sweep runs: the most that ever ran one run_id at
    once, and every run_id seen."""

    def __init__(self) -> None:
        self.most: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            counts: dict[str, int] = {}
            for run_id in bench_workers().values():
                counts[run_id] = counts.get(run_id, 0) + 1
            for run_id, n in counts.items():
                self.most[run_id] = max(self.most.get(run_id, 0), n)
            time.sleep(0.05)

    def __enter__(self) -> Overlap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def test_rows_equal_the_local_executors(cluster: Cluster, tmp_path: Path):
    suite = write_suite(tmp_path, "same")
    local = bench("run", str(suite), "--results", "local", cwd=tmp_path)
    assert local.returncode == 0, local.stdout + local.stderr
    with Overlap() as overlap:
        remote = bench(
            "run", str(suite), "--results", "ray", "--executor", "ray", "--address", cluster.address, cwd=tmp_path
        )
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert "4 runs: 4 ok" in remote.stdout
    assert set(overlap.most.values()) == {1}, overlap.most
    a, b = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert list(a.run_id) == list(b.run_id) and list(a.epoch) == list(b.epoch)
    assert list(a.status) == list(b.status) == ["ok"] * len(a)
    for column in ("epsilon", "epsilon_rdp", "noise_multiplier", "steps", "examples", "sample_rate"):
        assert a[column].equals(b[column]), column
    # Both backends are deterministic on CPU for a fixed seed: the same numbers, not merely close ones.
    for column in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert a[column].tolist() == b[column].tolist(), column
    assert set(b.hardware) == set(a.hardware) and set(b.git_commit) == set(a.git_commit)
    # started_at is when a node took the run, not when it was queued: two 1-CPU nodes take two runs at a time,
    # so the third run to start started after one of the first two had finished (finished_at is when the driver
    # wrote the row, up to a poll later than the node's end: a second of slack; each run takes several).
    first = b.groupby("run_id").agg(started=("started_at", "min"), finished=("finished_at", "max"))
    first = first.sort_values("started")
    assert first.started.iloc[2] >= first.finished.iloc[:2].min() - pd.Timedelta(seconds=1), first
    assert (first.finished - first.started).min() > pd.Timedelta(seconds=2), first
    # Two nodes, one CPU each: the runs were spread over both.
    nodes = {line.rsplit(" on ", 1)[1] for line in remote.stdout.splitlines() if "] ok " in line}
    assert len(nodes) == 2, remote.stdout
    # Resume and status work on the Ray executor's results as on the local one's.
    again = bench(
        "run", str(suite), "--results", "ray", "--executor", "ray", "--address", cluster.address, cwd=tmp_path
    )
    assert again.returncode == 0 and again.stdout.count("skip ") == 4, again.stdout
    logs = sorted((tmp_path / "ray" / "same" / "_logs").glob("*.log"))
    assert len(logs) == 4 and all("worker log from node" in p.read_text() for p in logs)


def _sweep_with_a_node_killed(cluster: Cluster, tmp_path: Path, node: str, *extra: str):
    """Run a 3-run sweep on the head, the second node and `node`, kill `node` once its run has trained an epoch,
    and return (the process, its output, the rows)."""
    raylet = cluster.add_node(node)
    suite = write_suite(tmp_path, node, epochs=40, backends="[jax]", seeds="[0, 1, 2]", privacy="[{dp: false}]")
    with Overlap() as overlap:
        proc = start_bench("run", str(suite), "--executor", "ray", "--address", cluster.address, *extra, cwd=tmp_path)

        def training_there() -> list[int]:
            jobs = _worker_jobs()
            return [p for p, job in jobs.items() if _descends_from(p, raylet) and _training(p, job)]

        victims = wait_for(training_there, 240, "a run training on the node to kill")
        cluster.kill_node(raylet)
        # The worker of the dead node dies with it (no orphan keeps training).
        wait_for(lambda: not any(p in bench_workers() for p in victims), 10, "the dead node's worker to exit")
        proc.wait(timeout=600)
    out = (tmp_path / "bench.out").read_text()
    assert set(overlap.most.values()) == {1}, f"a run executed twice at once: {overlap.most}\n{out}"
    return proc, out, rows(tmp_path / "results")


def test_a_node_killed_mid_sweep_leaves_a_complete_result_set(cluster: Cluster, tmp_path: Path):
    proc, out, df = _sweep_with_a_node_killed(cluster, tmp_path, "victim")
    assert proc.returncode == 0, out
    assert "3 runs: 3 ok" in out
    assert "(attempt 2 of 3)" in out, out
    assert set(df.status) == {"ok"} and df.run_id.nunique() == 3
    assert all(len(g) == 40 and list(g.epoch) == list(range(1, 41)) for _, g in df.groupby("run_id"))


def test_retries_are_bounded_then_the_run_is_failed_with_the_reason(cluster: Cluster, tmp_path: Path):
    proc, out, df = _sweep_with_a_node_killed(cluster, tmp_path, "doomed", "--ray-retries", "0")
    assert proc.returncode == 1, out
    failed = df[df.status != "ok"]
    assert failed.run_id.nunique() == 1 and set(failed.status) == {"failed"}, out
    error = failed.error.iloc[0]
    assert "the Ray task failed after 1 attempt (retries: 0), last on node" in error, error
    assert (df[df.status == "ok"].groupby("run_id").size() == 40).all() and df.run_id.nunique() == 3
    resumed = bench(
        "run",
        f"{tmp_path}/doomed.yaml",
        "--executor",
        "ray",
        "--address",
        cluster.address,
        "--retry-failed",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("skip ") == 2 and "3 runs: 3 ok" in resumed.stdout
    assert set(rows(tmp_path / "results").status) == {"ok"}


def start_until_training(cluster: Cluster, suite: Path, tmp_path: Path) -> tuple[subprocess.Popen, set[str]]:
    """`bench run --executor ray` in the background, once one of its runs has trained an epoch; and its run_ids."""
    run_ids = {r.run_id for r in load_suite(str(suite)).runs}
    proc = start_bench("run", str(suite), "--executor", "ray", "--address", cluster.address, cwd=tmp_path)
    wait_for(
        lambda: any(bench_workers().get(p) in run_ids and _training(p, j) for p, j in _worker_jobs().items()),
        240,
        "a run to train",
    )
    return proc, run_ids


def test_a_killed_driver_leaves_no_worker_and_resumes(cluster: Cluster, tmp_path: Path):
    suite = write_suite(tmp_path, "driver", epochs=40, backends="[jax]", seeds="[0, 1]", privacy="[{dp: false}]")
    proc, run_ids = start_until_training(cluster, suite, tmp_path)
    proc.kill()
    proc.wait()
    wait_for(lambda: not set(bench_workers().values()) & run_ids, 60, "Ray to end the dead driver's tasks")
    resumed = bench("run", str(suite), "--executor", "ray", "--address", cluster.address, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    df = rows(tmp_path / "results")
    assert set(df.status) == {"ok"} and df.run_id.nunique() == 2


def test_a_run_no_node_can_hold_fails_at_once(cluster: Cluster, tmp_path: Path):
    suite = write_suite(tmp_path, "big", epochs=1, threads="8", backends="[jax]", privacy="[{dp: false}]")
    proc = bench("run", str(suite), "--executor", "ray", "--address", cluster.address, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    df = rows(tmp_path / "results")
    assert set(df.status) == {"failed"}
    assert "no node of the Ray cluster has 8 CPUs" in df.error.iloc[0]


def test_cli_errors(tmp_path: Path):
    suite = write_suite(tmp_path, "cli")
    proc = bench("run", str(suite), "--address", "127.0.0.1:1", cwd=tmp_path)
    assert proc.returncode != 0 and "--address and --ray-retries need --executor ray" in proc.stderr
    port = _free_port()
    proc = bench("run", str(suite), "--executor", "ray", "--address", f"127.0.0.1:{port}", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and f"no Ray cluster at 127.0.0.1:{port}" in proc.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_cleanly_and_resumes(cluster: Cluster, tmp_path: Path, signum: int):
    suite = write_suite(tmp_path, "stop", epochs=600, backends="[jax]", seeds="[0, 1]", privacy="[{dp: false}]")
    proc, run_ids = start_until_training(cluster, suite, tmp_path)
    wait_for(lambda: "] run synthetic-mlp" in (tmp_path / "bench.out").read_text(), 30, "the driver to see it run")
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    out = (tmp_path / "bench.out").read_text()
    assert "To resume (finished runs are skipped): bench run" in out, out
    df = rows(tmp_path / "results")
    assert "interrupted" in set(df.status), out
    wait_for(lambda: not set(bench_workers().values()) & run_ids, 30, "the stopped runs' workers to exit")
    resumed = bench("run", str(suite), "--executor", "ray", "--address", cluster.address, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    df = rows(tmp_path / "results")
    assert set(df.status) == {"ok"} and (df.groupby("run_id").size() == 600).all()


def test_a_run_that_asks_for_a_gpu_runs_where_there_is_one(cluster: Cluster, tmp_path: Path):
    """Ray schedules GPUs as a resource: a node started with --num-gpus=1 offers one, whether or not it has a
    device (the backend then trains on the CPU here). Before that node joins, no node can hold the run."""
    suite = write_suite(tmp_path, "gpu", backends="[jax]", privacy="[{dp: false}]")
    suite.write_text(suite.read_text().replace("    model: mlp\n", "    model: mlp\n    perf: {gpus: 1}\n"))
    proc = bench("run", str(suite), "--executor", "ray", "--address", cluster.address, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "no node of the Ray cluster has 1 GPUs" in rows(tmp_path / "results").error.iloc[0]
    raylet = cluster.add_node("gpu", "--num-gpus=1")
    seen: list[tuple[int, bool]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.extend((p, _descends_from(p, raylet)) for p in bench_workers())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = bench(
            "run", str(suite), "--executor", "ray", "--address", cluster.address, "--retry-failed", cwd=tmp_path
        )
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen and all(on_gpu_node for _, on_gpu_node in seen), seen
    assert set(rows(tmp_path / "results").status) == {"ok"}


def test_a_node_creates_the_backend_environment_itself(cluster: Cluster, tmp_path: Path):
    """On first use a node builds the backend's environment in its own envs folder, and the driver shows pip's
    progress. This node is offline (PIP_NO_INDEX), so the build fails: the run is `failed` with pip's error
    naming the backend, as locally. Only this node has 2 CPUs, so only it can hold the 2-thread run."""
    envs = tmp_path / "node-envs"
    cluster.add_node("bare", "--num-cpus=2", env={"BENCH_ENVS_DIR": str(envs), "PIP_NO_INDEX": "1"})
    suite = write_suite(tmp_path, "bare", epochs=1, threads="2", backends="[jax]", privacy="[{dp: false}]")
    proc = bench("run", str(suite), "--executor", "ray", "--address", cluster.address, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"creating the jax environment in {envs / 'jax'}" in proc.stdout, proc.stdout
    (error,) = set(rows(tmp_path / "results").error)
    assert "creating the jax environment failed" in error, error
    assert (envs / "jax" / "bin" / "python").exists() and not (envs / "jax" / ".dpbench-requirements").exists()
