"""Run a sweep: one worker subprocess per run, progress, timeouts, memory limit, resume, probes, Parquet results.

Reliability (see README, "Reliability"): a run holds an exclusive lock on its run_id while it executes, so two
`bench run` on one results folder never execute a run at once; a worker dies with the runner (PR_SET_PDEATHSIG),
so a killed sweep leaves no orphan training behind; a result is written atomically, and a write that fails (a
full disk) stops the sweep with a clear error instead of leaving a corrupt file or losing the next runs too.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bench import accounting
from bench.data.prepare import prepared_path
from bench.envs import PROJECT_ROOT, EnvError, ensure_env
from bench.memory import GIB, MemoryWatchdog, default_memory_limit_gb
from bench.results import RunLock, lock_path, read_status, remove_stale_temp_files, result_path, write_rows
from bench.spec import RunSpec
from bench.suite import Suite
from bench.worker import THREAD_VARS

EnvMode = Literal["isolated", "current"]
FINAL = ("ok", "failed", "oom", "timeout", "diverged", "unsupported")
NOT_RETRIED = ("ok", "unsupported")  # --retry-failed: an unsupported run would end the same way again
SHUFFLE_NOTE = "shuffle sampling: epsilon assumes Poisson subsampling and is not a valid guarantee"
POLL_S = 0.2


@dataclass
class Outcome:
    run: RunSpec
    status: str
    error: str
    path: Path
    skipped: bool = False
    elsewhere: bool = False  # executed by another `bench run` on the same results folder while this one waited


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, see `bench run`) stopped a sweep: the outcomes so far and the run it stopped, whose
    partial result was written with status "interrupted" (None when it stopped between runs). `stopped` lists
    every run it stopped where several ran at once (the Ray executor)."""

    def __init__(
        self, outcomes: list[Outcome], current: Outcome | None, reason: str, stopped: list[Outcome] | None = None
    ):
        super().__init__(reason)
        self.outcomes = outcomes
        self.current = current
        self.stopped = stopped if stopped is not None else [current] if current else []


class ResultWriteError(RuntimeError):
    """A result file could not be written (a full disk, a read-only folder): the sweep stops, since every later
    run would end the same way after its hours of training. Files written before are intact; `outcomes` are the
    runs recorded before it."""

    def __init__(self, message: str, outcomes: list[Outcome] | None = None):
        super().__init__(message)
        self.outcomes = outcomes or []


@dataclass
class WorkerExit:
    returncode: int | None
    timed_out: bool
    over_memory: str  # the watchdog's error when it stopped the worker, else ""
    log: Path


@dataclass
class ProbeResult:
    """A probe's measurements; seconds are None unless status is "ok"."""

    status: str
    error: str
    build_seconds: float | None = None
    first_step_seconds: float | None = None
    step_seconds: float | None = None
    startup_seconds: float | None = None  # worker launch until built: interpreter, imports, data, build

    def projected_seconds(self, total_steps: int) -> float | None:
        """Training wall time of a run: start-up and build, the first step, the rest at the median step."""
        if self.status != "ok" or self.step_seconds is None or self.first_step_seconds is None:
            return None
        startup = self.startup_seconds if self.startup_seconds is not None else self.build_seconds or 0.0
        return startup + self.first_step_seconds + max(total_steps - 1, 0) * self.step_seconds


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _hardware() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def provenance() -> dict[str, str]:
    """This machine's `hardware` and the checkout's `git_commit`, as every result row records them."""
    return {"hardware": _hardware(), "git_commit": _git_commit()}


def worker_env(run: RunSpec) -> dict[str, str]:
    """The same thread pinning for every backend, and `bench` importable from the checkout."""
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(run.perf.threads)
    env["TF_NUM_INTEROP_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Whole JSON lines from `offset` on; a partly written last line waits for the next read."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    events = []
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events, offset + end


def identity_columns(run: RunSpec) -> dict[str, Any]:
    """What a run is, as the columns that run results and audit records share."""
    return {
        "suite": run.suite,
        "workload": run.workload,
        "dataset": run.dataset.name,
        "model": run.model,
        "backend": run.backend,
        "variant": run.variant,
        "seed": run.seed,
        "dp": run.dp.enabled,
    }


def build_rows(
    run: RunSpec,
    events: list[dict[str, Any]],
    status: str,
    error: str,
    started: float,
    host: dict[str, str] | None = None,
) -> list[dict]:
    """One row per finished epoch (a single row when none finished), epsilon from the core. `host` is the
    provenance of the machine that ran the worker (`hardware`, `git_commit`) when it is not this one."""
    fed = run.federated
    epochs = [e for e in events if e["event"] == ("round" if fed else "epoch")]
    built = next((e for e in events if e["event"] == "built"), {})
    compiled = next((e for e in events if e["event"] == "compiled"), {})
    start = next((e for e in events if e["event"] == "start"), {})
    sigma = run.dp.noise_multiplier if run.dp.enabled else None
    eps: list[accounting.Epsilons | None] = [None] * len(epochs)
    if sigma is not None and epochs and fed is not None:
        eps = accounting.epsilon_curve(
            sample_rate=run.sample_rate, noise_multiplier=sigma, steps=range(1, len(epochs) + 1), delta=run.dp.delta
        )
    elif sigma is not None and epochs:
        eps = accounting.epsilon_curve(  # one composition carried along: seconds, not a fresh PLD per epoch
            sample_rate=run.sample_rate,
            noise_multiplier=sigma,
            steps=[e * run.steps_per_epoch for e in range(1, len(epochs) + 1)],
            delta=run.dp.delta,
        )
    base = {
        "run_id": run.run_id,
        **identity_columns(run),
        "noise_multiplier": sigma,
        "target_epsilon": run.dp.target_epsilon,
        "max_grad_norm": run.dp.max_grad_norm if run.dp.enabled else None,
        "batch_size": run.train.batch_size,
        "sampling": run.dp.sampling,
        "sample_rate": run.sample_rate,
        "delta": run.dp.delta,
        "epochs": run.train.epochs,
        "steps_per_epoch": run.steps_per_epoch,
        "dataset_size": run.dataset_size,
        "optimizer": run.train.optimizer.name,
        "learning_rate": run.train.optimizer.learning_rate,
        "augment": run.dataset.augment,
        "workload_kind": "federated" if fed else "centralized",
        "total_clients": fed.total_clients if fed else None,
        "clients_per_round": fed.clients_per_round if fed else None,
        "rounds": fed.rounds if fed else None,
        "compile_seconds": compiled.get("seconds"),
        "accounting_note": SHUFFLE_NOTE if run.dp.enabled and run.dp.sampling == "shuffle" else "",
        "status": status,
        "error": error,
        "versions": json.dumps(built.get("versions", {}), sort_keys=True),
        "python": start.get("python", ""),
        "hardware": host["hardware"] if host else _hardware(),
        "threads": run.perf.threads,
        "git_commit": host["git_commit"] if host else _git_commit(),
        "started_at": datetime.fromtimestamp(started, UTC),
        "finished_at": datetime.now(UTC),
        "spec": json.dumps(run.to_dict(), sort_keys=True),
    }
    if not epochs:
        return [{**base, "epoch": 0}]
    if fed is not None:
        return [_round_row(base, e, ep) for e, ep in zip(epochs, eps)]
    rows = []
    for e, ep in zip(epochs, eps):
        seconds = e["train_seconds"]
        rows.append(
            {
                **base,
                **{k: e.get(k) for k in ("epoch", "steps", "examples", "train_loss", "train_accuracy")},
                **{k: e.get(k) for k in ("test_loss", "test_accuracy", "train_seconds", "epoch_seconds")},
                **{k: e.get(k) for k in ("physical_batch_size", "peak_memory_mb", "compilations")},
                "examples_per_second": e["examples"] / seconds if seconds else None,
                "epsilon": ep.pld if ep else None,
                "epsilon_rdp": ep.rdp if ep else None,
                "epsilon_reported": e.get("epsilon_reported"),
            }
        )
    canaries = next((e for e in events if e["event"] == "canaries"), None)
    if canaries is not None:  # a one-run audit's evidence, about the final model: on the last epoch's row
        rows[-1].update(
            canary_kind=canaries["kind"], canary_scores=canaries["scores"], canary_included=canaries["included"]
        )
    return rows


def _round_row(base: dict, e: dict, ep: accounting.Epsilons | None) -> dict:
    """A federated round's row: `epoch` is the round; time is the backends' local training (train_seconds) and
    the whole round with the core's sampling, aggregation and server update (epoch_seconds)."""
    seconds = e["train_seconds"]
    return {
        **base,
        "epoch": e["round"],
        "steps": e["round"],
        **{k: e.get(k) for k in ("examples", "train_loss", "train_accuracy", "test_loss", "test_accuracy")},
        **{k: e.get(k) for k in ("sampled_clients", "clip_norm", "unclipped_fraction", "peak_memory_mb")},
        "train_seconds": seconds,
        "epoch_seconds": e["round_seconds"],
        "examples_per_second": e["examples"] / seconds if seconds else None,
        "epsilon": ep.pld if ep else None,
        "epsilon_rdp": ep.rdp if ep else None,
    }


def _finish_status(
    run: RunSpec, events: list[dict], returncode: int | None, timed_out: bool, over_memory: str = ""
) -> tuple[str, str]:
    end = next((e for e in reversed(events) if e["event"] == "end"), None)
    unit, planned = ("round", run.federated.rounds) if run.federated else ("epoch", run.train.epochs)
    done = sum(1 for e in events if e["event"] == unit)
    if over_memory:
        return "oom", over_memory
    if timed_out:
        return "timeout", f"run exceeded its time limit after {done} of {planned} {unit}s"
    if end is not None:
        status, error = end["status"], end.get("error", "")
        if status == "ok" and done < planned:
            return "failed", f"worker reported ok after {done} of {planned} {unit}s"
        return status, error
    return _abnormal_exit(returncode)


def _abnormal_exit(returncode: int | None) -> tuple[str, str]:
    """The status of a worker that ended without an "end" event."""
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode).name
        if sig == "SIGKILL":
            return "oom", "worker killed by SIGKILL (most likely the kernel's out-of-memory killer)"
        return "failed", f"worker killed by {sig}"
    return "failed", f"worker exited with code {returncode} without finishing (see its log)"


def _probe_result(events: list[dict], ended: WorkerExit, launched: float, timeout: float, steps: int) -> ProbeResult:
    if ended.over_memory:
        return ProbeResult("oom", ended.over_memory)
    if ended.timed_out:
        return ProbeResult("timeout", f"no probe result within {timeout:g} s (start-up, build and {steps + 1} steps)")
    found = next((e for e in events if e["event"] == "probe"), None)
    end = next((e for e in reversed(events) if e["event"] == "end"), None)
    if end is not None and end["status"] != "ok":
        return ProbeResult(end["status"], end.get("error", ""))
    if found is None:
        status, error = _abnormal_exit(ended.returncode) if end is None else ("failed", "no probe event")
        return ProbeResult(status, f"{error}\n{_tail(ended.log)}")
    built = next((e for e in events if e["event"] == "built"), found)
    return ProbeResult(
        "ok",
        "",
        build_seconds=found["build_seconds"],
        first_step_seconds=found["first_step_seconds"],
        step_seconds=found["step_seconds"],
        startup_seconds=built["time"] - launched,
    )


def probe_key(run: RunSpec) -> tuple:
    """Runs that differ only in privacy level (sigma, epsilon, learning rate) and seed cost the same per step."""
    return (
        run.backend_label,
        run.workload,
        run.model,
        run.dataset,
        run.train.batch_size,
        run.dp.enabled,
        run.perf.threads,
    )


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the worker when the runner dies, however it dies (Linux): a
    killed `bench run` leaves no orphan worker training on, which would also skew the timings of the runs after
    a restart. Between fork and exec it makes one pre-resolved C call and takes no lock another thread could hold.
    The worker's own children are not covered; the timeout and the watchdog kill its whole process group."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL))
        if os.getppid() != parent:  # the runner died before prctl took effect
            os._exit(1)

    return preexec


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of a result file's current content: a rename over it (a new result) changes the inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _memory_error(used: float, limit: float) -> str:
    return (
        f"worker used {used / GIB:.1f} GiB, over the memory limit of {limit / GIB:.1f} GiB "
        "(set memory_limit_gb in the suite or --memory-limit)"
    )


def run_worker(
    python: str,
    run: RunSpec,
    job: dict[str, Any],
    stem: Path,
    timeout: float,
    memory_limit: float | None,
    events: list[dict],
    on_event: Callable[[dict], None] | None = None,
    extra_env: dict[str, str] | None = None,
) -> WorkerExit:
    """Start `python -m bench.worker` on `job` and follow its events until it ends, runs out of time
    or outgrows its memory limit (bytes); `events` fills as they arrive, so a caller interrupted by
    Ctrl-C still has them. The worker's process group is killed on the way out, whatever happened.
    Both executors use it: the local one on this machine, the Ray one on the node that runs the task."""
    events_path, job_path, log_path = (Path(f"{stem}.{ext}") for ext in ("events.jsonl", "job.json", "log"))
    events_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps({**job, "events": str(events_path)}))
    offset, timed_out, over_memory = 0, False, ""

    def drain() -> None:
        nonlocal offset
        new, offset = read_events(events_path, offset)
        for e in new:
            events.append(e)
            if on_event:
                on_event(e)

    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [python, "-m", "bench.worker", str(job_path)],
            cwd=PROJECT_ROOT,
            env={**worker_env(run), **(extra_env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C reaches the runner only; the runner stops the worker
            preexec_fn=_die_with_parent(),
        )
        launched = time.monotonic()
        watchdog = MemoryWatchdog(proc.pid, memory_limit)
        try:
            while proc.poll() is None:
                drain()
                if time.monotonic() - launched > timeout:
                    timed_out = True
                    break
                used = watchdog.exceeded()
                if used is not None:
                    over_memory = _memory_error(used, memory_limit or 0)
                    break
                time.sleep(POLL_S)
        finally:
            _kill(proc)
            drain()
    return WorkerExit(proc.returncode, timed_out, over_memory, log_path)


class Runner:
    """Executes RunSpecs one after another, each in a fresh worker process."""

    def __init__(
        self,
        results_dir: Path,
        *,
        env: EnvMode = "isolated",
        timeout: float | None = None,
        memory_limit_gb: float | None = None,
        log: Callable[[str], None] = print,
        on_progress: Callable[[RunSpec, dict], None] | None = None,
    ):
        self.results_dir = Path(results_dir).resolve()
        self.env = env
        self.timeout = timeout
        self.memory_limit_gb = memory_limit_gb
        self.log = log
        self.on_progress = on_progress
        self._env_errors: dict[str, str] = {}  # backends whose environment failed in this sweep: not tried again
        self._interrupted: Outcome | None = None

    def python_for(self, backend: str) -> str:
        """The backend's python, its environment created on first use. An environment that cannot be created
        fails every run of that backend with an error naming it (tried once per Runner, not once per run)."""
        if self.env == "current":
            return sys.executable
        if backend in self._env_errors:
            raise EnvError(self._env_errors[backend])
        try:
            return str(ensure_env(backend, self.log))
        except (EnvError, OSError) as e:
            message = str(e) if isinstance(e, EnvError) else f"the {backend} environment could not be created: {e}"
            self._env_errors[backend] = f"{message}\n(not tried again for this backend's other runs of this sweep)"
            raise EnvError(message) from e

    def should_skip(self, run: RunSpec, force: bool, retry_failed: bool) -> str | None:
        path = result_path(self.results_dir, run.suite, run.run_id)
        status = read_status(path) if path.exists() else None
        if force or status not in FINAL or (retry_failed and status not in NOT_RETRIED):
            return None
        return status

    def memory_limit_bytes(self, memory_limit_gb: float | None = None) -> float | None:
        """The given limit, else the Runner's, else 90% of the machine's memory."""
        gb = memory_limit_gb or self.memory_limit_gb or default_memory_limit_gb()
        return gb * GIB if gb else None

    def _logs_dir(self, run: RunSpec) -> Path:
        logs = result_path(self.results_dir, run.suite, run.run_id).parent / "_logs"  # "_": dataset reads skip it
        logs.mkdir(parents=True, exist_ok=True)
        return logs

    def _write(self, run: RunSpec, path: Path, rows: list[dict]) -> None:
        try:
            write_rows(path, rows)
        except OSError as e:
            raise ResultWriteError(f"could not write the result of run {run.run_id} to {path}: {e}") from e

    def execute(self, run: RunSpec, timeout: float, memory_limit_gb: float | None = None) -> Outcome:
        """Run one RunSpec in a worker and write its result, whatever its ending. A KeyboardInterrupt writes
        the epochs so far with status "interrupted" and propagates; a failed write raises ResultWriteError."""
        path = result_path(self.results_dir, run.suite, run.run_id)
        logs = self._logs_dir(run)
        started = time.time()
        try:
            python = self.python_for(run.backend)
            data = prepared_path(run.dataset)
        except (EnvError, OSError, ValueError) as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            self._write(run, path, build_rows(run, [], status, error, started))
            return Outcome(run, status, error, path)
        events: list[dict] = []
        job = {"run": run.to_dict(), "data": str(data)}
        limit = self.memory_limit_bytes(memory_limit_gb)
        on_event = (lambda e: self.on_progress(run, e)) if self.on_progress else None
        try:
            ended = run_worker(python, run, job, logs / run.run_id, timeout, limit, events, on_event)
        except KeyboardInterrupt as e:
            error = str(e) or "interrupted by the user"
            self._write(run, path, build_rows(run, events, "interrupted", error, started))
            self._interrupted = Outcome(run, "interrupted", error, path)
            raise
        status, error = _finish_status(run, events, ended.returncode, ended.timed_out, ended.over_memory)
        if status == "failed" and not any(e["event"] == "end" for e in events):
            error += "\n" + _tail(ended.log)
        self._write(run, path, build_rows(run, events, status, error, started))
        return Outcome(run, status, error, path)

    def probe(self, run: RunSpec, steps: int, timeout: float, memory_limit_gb: float | None = None) -> ProbeResult:
        """Measure what a run costs per step (build, one warm-up step, `steps` timed steps) in a worker
        like `execute`'s, under the same limits; writes no result, only logs (`_logs/probe-<run_id>.*`)."""
        try:
            python = self.python_for(run.backend)
            data = prepared_path(run.dataset)
        except (EnvError, OSError, ValueError) as e:
            return ProbeResult("failed", f"{type(e).__name__}: {e}")
        events: list[dict] = []
        job = {"run": run.to_dict(), "data": str(data), "max_steps": steps}
        stem = self._logs_dir(run) / f"probe-{run.run_id}"
        launched = time.time()
        ended = run_worker(python, run, job, stem, timeout, self.memory_limit_bytes(memory_limit_gb), events)
        return _probe_result(events, ended, launched, timeout, steps)

    def run_suite(
        self,
        suite: Suite,
        *,
        force: bool = False,
        retry_failed: bool = False,
        on_start: Callable[[int, RunSpec], None] | None = None,
    ) -> list[Outcome]:
        """Every run of the suite, in order, each under its run_id's lock. A run that another `bench run` on the
        same results folder is executing is skipped at first and waited for after the others: then its result
        counts (`elsewhere`), or, if that process died without one, it runs here.

        Raises SweepInterrupted on Ctrl-C and ResultWriteError when a result cannot be written; both carry the
        outcomes so far."""
        done: dict[int, Outcome] = {}
        deferred: list[tuple[int, RunSpec, tuple | None]] = []
        total = len(suite.runs)
        limits = (self.timeout or suite.timeout, self.memory_limit_gb or suite.memory_limit_gb)
        self._interrupted = None
        try:
            for i, run in enumerate(suite.runs, 1):
                if on_start:
                    on_start(i - 1, run)
                stamp = _stamp(result_path(self.results_dir, run.suite, run.run_id))
                claim = self._claim(i, total, run, force, retry_failed)
                if isinstance(claim, Outcome):
                    done[i] = claim
                elif claim is None:
                    deferred.append((i, run, stamp))
                else:
                    with claim:
                        done[i] = self._run_locked(i, total, run, stamp, limits)
            for i, run, stamp in deferred:
                if on_start:
                    on_start(i - 1, run)
                with self._wait_for_lock(i, total, run):
                    done[i] = self._run_locked(i, total, run, stamp, limits)
        except KeyboardInterrupt as e:
            raise SweepInterrupted([done[k] for k in sorted(done)], self._interrupted, str(e)) from e
        except ResultWriteError as e:
            e.outcomes = [done[k] for k in sorted(done)]
            raise
        return [done[k] for k in sorted(done)]

    def _claim(self, i: int, total: int, run: RunSpec, force: bool, retry_failed: bool) -> Outcome | RunLock | None:
        """A run's place in the sweep: its Outcome when it is finished already (skipped), None when another
        `bench run` on the same folder holds it (deferred to the end of the sweep), else its lock, now held."""
        status = self.should_skip(run, force, retry_failed)
        if status is not None:
            self.log(f"[{i}/{total}] skip {describe_run(run)}: already {status} (use --force to re-run)")
            return Outcome(run, status, "", result_path(self.results_dir, run.suite, run.run_id), True)
        lock = RunLock(lock_path(self.results_dir, run.suite, run.run_id))
        if lock.acquire():
            return lock
        self.log(
            f"[{i}/{total}] skip {describe_run(run)}: running in another bench run ({lock.holder()}); "
            "skipped, its result is checked at the end of this sweep"
        )
        return None

    def _wait_for_lock(self, i: int, total: int, run: RunSpec) -> RunLock:
        """A deferred run's lock, once the other `bench run` lets go of it."""
        lock = RunLock(lock_path(self.results_dir, run.suite, run.run_id))
        if not lock.acquire():
            self.log(f"[{i}/{total}] waiting for {describe_run(run)}: running in another bench run ({lock.holder()})")
            lock.acquire(wait=True)
        return lock

    def _run_locked(
        self,
        i: int,
        total: int,
        run: RunSpec,
        stamp: tuple | None,
        limits: tuple[float, float | None],
    ) -> Outcome:
        """Execute a run whose lock this process holds, unless another `bench run` finished it since `stamp`."""
        path = result_path(self.results_dir, run.suite, run.run_id)
        label = describe_run(run)
        if _stamp(path) != stamp:  # written by another bench run since this one looked: resume semantics
            status = read_status(path)
            if status in FINAL:  # not "interrupted" (nor unreadable): that one runs here
                self.log(f"[{i}/{total}] {status} {label} (run by another bench run)")
                return Outcome(run, status, "", path, skipped=True, elsewhere=True)
        remove_stale_temp_files(path)  # left by a writer killed mid-write; nobody else writes it while we hold the lock
        self.log(f"[{i}/{total}] run {label}")
        outcome = self.execute(run, *limits)
        msg = f"[{i}/{total}] {outcome.status} {label}"
        self.log(msg + (f": {outcome.error.splitlines()[0]}" if outcome.error else ""))
        return outcome


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def describe_run(run: RunSpec) -> str:
    if not run.dp.enabled:
        privacy = "non-private"
    else:
        privacy = f"sigma={run.dp.noise_multiplier:g}"
        if run.dp.target_epsilon is not None:
            privacy += f" (eps={run.dp.target_epsilon:g})"
    if run.federated is not None:
        privacy += f" clients/round={run.federated.clients_per_round}"
    return f"{run.workload} {run.backend_label} {privacy} seed={run.seed} ({run.run_id})"


def projected_epsilon(run: RunSpec) -> float | None:
    """The run's final epsilon (PLD) before it runs; None without DP or where dp-accounting cannot compute it
    (e.g. it runs out of memory for an absurd number of steps)."""
    if not run.dp.enabled or run.dp.noise_multiplier is None:
        return None
    try:
        eps = accounting.epsilon(
            sample_rate=run.sample_rate,
            noise_multiplier=run.dp.noise_multiplier,
            steps=run.total_steps,
            delta=run.dp.delta,
        )
    except (MemoryError, OverflowError, ValueError):
        return None
    return eps.pld if math.isfinite(eps.pld) else math.inf
