"""Shared fixtures for the reliability tests: real `bench run` processes, fake workers, tiny suites.

- `tiny_suite(folder, ...)`: writes a small synthetic-data MLP suite on the `jax` backend (non-private by
  default: no accounting, so a run takes a few seconds) and returns its path and run_ids in sweep order.
- `BenchProcess` / `start_bench(...)`: `bench run ...` as a real subprocess in its own session (signals go to
  its process group, as a terminal's Ctrl-C does), output in a file; `.signal()`, `.wait()`, `.output()`.
- `jax_env` fixture: skips unless the jax environment (.envs/jax) is ready.
- `fake_python(folder, body)`: an executable standing in for a backend's python; it runs FAKE_PRELUDE + `body`
  instead of `bench.worker`. The prelude gives `job`, `run` (the RunSpec as a dict), `emit(event, **fields)`,
  `epoch(k)` (a complete "epoch" event), `train(n)` (n epochs) and `finish()` (the "end ok" event).
- `fake_runner` fixture: `fake_runner(body, results=None)` -> a Runner whose workers run `body`.
- `small_run(**changes)` and `suite_of(*runs)`: RunSpecs and Suites for in-process Runner tests.
- `wait_for(predicate, timeout, what)`, `alive(pid)`, `events_of(results, suite, run_id)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.envs import PROJECT_ROOT
from bench.runner import Runner
from bench.spec import DatasetSpec, DPConfig, RunSpec, TrainConfig
from bench.suite import Suite, load_suite

SUITE = """
name: {name}
description: "reliability test"
backends: [jax]
seeds: {seeds}
threads: 1
timeout: {timeout}
workloads:
  - name: synthetic-mlp
    dataset: {{name: synthetic, train_size: {train_size}, test_size: 64, shape: [4, 4, 1], num_classes: 4}}
    model: mlp
    train:
      epochs: {epochs}
      batch_size: {batch_size}
      optimizer: {{name: sgd, learning_rate: 0.1}}
    dp: {{max_grad_norm: 1.0, delta: 1.0e-5}}
    privacy:
      - dp: false
"""


def tiny_suite(
    folder: Path,
    *,
    name: str = "tiny",
    seeds: tuple[int, ...] = (0,),
    epochs: int = 2,
    train_size: int = 256,
    batch_size: int = 64,
    timeout: float = 300,
) -> tuple[Path, list[str]]:
    """A YAML suite of len(seeds) jax runs; returns its path and the run_ids in the order the sweep runs them."""
    path = Path(folder) / f"{name}.yaml"
    path.write_text(
        SUITE.format(
            name=name,
            seeds=list(seeds),
            epochs=epochs,
            train_size=train_size,
            batch_size=batch_size,
            timeout=timeout,
        )
    )
    return path, [r.run_id for r in load_suite(path).runs]


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of a `bench` subprocess: this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


class BenchProcess:
    """`python -m bench ARGS` in its own session, stdout and stderr to one file."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None, tag: str = "bench"):
        self.log = Path(cwd) / f"{tag}-{time.monotonic_ns()}.out"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench", *args],
                cwd=cwd,
                env=env or bench_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def signal(self, sig: int) -> None:
        """Send `sig` to the process group, as a terminal does for Ctrl-C."""
        os.killpg(self.pid, sig)

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"bench did not finish within {timeout} s:\n{self.output()}") from None

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_bench(*args: str, cwd: Path, env: dict[str, str] | None = None, tag: str = "bench") -> BenchProcess:
    return BenchProcess(list(args), cwd, env, tag)


@pytest.fixture
def bench_processes():
    """Starts `bench` processes (like start_bench) and kills any still running at teardown."""
    started: list[BenchProcess] = []

    def start(*args: str, cwd: Path, env: dict[str, str] | None = None, tag: str = "bench") -> BenchProcess:
        p = start_bench(*args, cwd=cwd, env=env, tag=tag)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.kill()


@pytest.fixture(scope="session")
def jax_env() -> Path:
    from bench.envs import env_python, is_ready

    if not is_ready("jax"):
        pytest.skip("the jax environment is not ready (make envs)")
    return env_python("jax")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def events_of(results: Path, suite: str, run_id: str) -> list[dict]:
    path = Path(results) / suite / "_logs" / f"{run_id}.events.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


# --------------------------------------------------------------------------- fake workers

FAKE_PRELUDE = """
import json, os, signal, subprocess, sys, time

job = json.load(open(sys.argv[-1]))
run = job["run"]


def emit(event, **fields):
    with open(job["events"], "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\\n")


def epoch(k):
    emit("epoch", epoch=k, steps=4 * k, examples=200, train_loss=1.0 / k, train_accuracy=0.5, test_loss=1.0,
         test_accuracy=0.5, train_seconds=0.01, epoch_seconds=0.02, physical_batch_size=64, peak_memory_mb=10.0,
         compilations=1, epsilon_reported=None)


def train(n):
    for k in range(1, n + 1):
        epoch(k)


def finish():
    emit("end", status="ok", error="")


emit("start", pid=os.getpid(), python="3")
"""


def fake_python(folder: Path, body: str, name: str = "fake-python") -> Path:
    """An executable to use as a backend's python: runs FAKE_PRELUDE + body with the job file as last argument."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"{name}.py"
    script.write_text(FAKE_PRELUDE + "\n" + body)
    python = folder / name
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    return python


@pytest.fixture
def fake_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """fake_runner(body, results=None, **runner_kwargs) -> a Runner (results in tmp_path/results by default)
    whose every worker runs `body` (see FAKE_PRELUDE); its log lines are collected in `runner.lines`."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    count = 0

    def make(body: str, results: Path | None = None, **kwargs) -> Runner:
        nonlocal count
        count += 1
        python = fake_python(tmp_path / "fake", body, name=f"fake-python-{count}")
        lines: list[str] = []
        runner = Runner(results or tmp_path / "results", env="current", log=lines.append, **kwargs)
        runner.python_for = lambda backend: str(python)
        runner.lines = lines
        return runner

    return make


def small_run(**changes) -> RunSpec:
    """A 2-epoch jax run on a tiny synthetic dataset; `seed=` etc. make distinct run_ids."""
    run = RunSpec(
        suite="rel",
        workload="w",
        dataset=DatasetSpec(name="synthetic", train_size=200, test_size=40, shape=(4, 4, 1), num_classes=3),
        model="mlp",
        train=TrainConfig(epochs=2, batch_size=50),
        dp=DPConfig(enabled=False),
        backend="jax",
        variant="bk",
        dataset_size=200,
    )
    return dataclasses.replace(run, **changes)


def suite_of(*runs: RunSpec, timeout: float = 60) -> Suite:
    return Suite(name=runs[0].suite, path=Path("rel.yaml"), description="", runs=tuple(runs), timeout=timeout)
