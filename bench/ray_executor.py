"""Run a sweep on a Ray cluster (`bench run SUITE --executor ray`).

Each run becomes one Ray task that reserves what its spec asks for (`threads` CPUs, `gpus` GPUs) and, on the node
Ray picks, executes the same worker the local executor does: `<env python> -m bench.worker` in the backend's
environment on that node (created there on first use), under the same timeout and memory watchdog. The task
returns the worker's events; the driver turns them into rows and writes them exactly as the local Runner does,
under the same per-run lock, so resume, status, reports and comparisons do not know which executor ran a run.

A task whose node dies is retried by Ray up to `retries` times, then recorded as `failed` with Ray's reason.
Killing the driver kills its tasks (Ray ends the tasks of a dead owner; a worker dies with its task) and frees its
locks, so a restarted `bench run` resumes as locally. Ray is an optional extra, imported only here.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.data.prepare import prepared_path
from bench.envs import EnvError, ensure_env
from bench.memory import GIB, default_memory_limit_gb
from bench.results import RunLock, read_status, remove_stale_temp_files, result_path
from bench.runner import (
    FINAL,
    EnvMode,
    Outcome,
    ResultWriteError,
    Runner,
    SweepInterrupted,
    _finish_status,
    _git_commit,
    _hardware,
    _stamp,
    build_rows,
    describe_run,
    run_worker,
)
from bench.spec import RunSpec
from bench.suite import Suite

DEFAULT_RETRIES = 2
POLL_S = 0.5
LOG_LINES = 400  # of a worker's log, brought back to the driver's _logs folder


class RayUnavailable(RuntimeError):
    """Ray is not installed, or no cluster answers at the address: the message says what to do."""


def _ray():
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(
            "the Ray executor needs Ray: pip install -e '.[ray]' (the local executor, the default, does not)"
        ) from e
    return ray


# --- on the node -------------------------------------------------------------------------------------------


class EventSink:
    """A Ray actor that carries the workers' events to the driver while runs are in progress (the final events
    also come back with the task's result). Each task attempt tags its events, so a retry starts afresh."""

    def __init__(self) -> None:
        self._batches: list[tuple[str, str, list[dict]]] = []

    def push(self, run_id: str, attempt: str, events: list[dict]) -> None:
        self._batches.append((run_id, attempt, events))

    def take(self) -> list[tuple[str, str, list[dict]]]:
        batches, self._batches = self._batches, []
        return batches


def execute_on_node(
    job: dict[str, Any], env: EnvMode, timeout: float, memory_limit_gb: float | None, sink: Any
) -> dict[str, Any]:
    """A Ray task: one run's worker on this node, its events pushed to `sink` as they come; returns them with
    how the worker ended and this node's provenance. Never raises for the run's own failures: those are in the
    events or in `setup_error`, as the local executor records them."""
    run = RunSpec.from_dict(job["run"])
    attempt = uuid.uuid4().hex
    node = f"{socket.gethostname()}/{_ray().get_runtime_context().get_node_id()[:8]}"
    host = {"node": node, "hardware": _hardware(), "git_commit": _git_commit()}

    def push(*events: dict) -> None:
        sink.push.remote(run.run_id, attempt, list(events))

    push({"event": "node", "time": time.time(), **host})
    mismatch = commit_mismatch(host["git_commit"], job.get("git_commit", ""), node)
    if mismatch:
        return {**host, "attempt": attempt, "setup_error": mismatch}
    try:
        python = sys.executable if env == "current" else str(ensure_env(run.backend, lambda m: push(_log(m))))
        data = prepared_path(run.dataset)
    except (EnvError, OSError, ValueError) as e:
        return {**host, "attempt": attempt, "setup_error": f"{type(e).__name__}: {e}"}
    gb = memory_limit_gb or default_memory_limit_gb()
    events: list[dict] = []
    with tempfile.TemporaryDirectory(prefix=f"dpbench-{run.run_id}-") as tmp:
        ended = run_worker(
            python,
            run,
            {"run": job["run"], "data": str(data)},
            Path(tmp) / run.run_id,
            timeout,
            gb * GIB if gb else None,
            events,
            on_event=lambda e: push(e),
            extra_env=device_env(run.perf.gpus),
        )
        log = ended.log.read_text(errors="replace").splitlines()[-LOG_LINES:]
    return {
        **host,
        "attempt": attempt,
        "events": events,
        "returncode": ended.returncode,
        "timed_out": ended.timed_out,
        "over_memory": ended.over_memory,
        "log": "\n".join(log),
    }


def device_env(gpus: int) -> dict[str, str]:
    """What the worker may see of the node's GPUs. Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned a task
    that reserved some, but leaves every GPU visible to a task that reserved none; such a run would then share a
    GPU it does not own with the runs that do (measured on an H100: a run reserving none hit CUDA out of memory
    beside JAX's preallocation). So a run that reserves no GPU sees none and trains on the CPU."""
    return {} if gpus else {"CUDA_VISIBLE_DEVICES": ""}


def commit_mismatch(node_commit: str, driver_commit: str, node: str) -> str:
    """Why a node must not run the driver's runs: another commit of the code would be compared as if it were
    the same; "" when both are the same or either is unknown (not a git checkout)."""
    if node_commit and driver_commit and node_commit != driver_commit:
        return (
            f"node {node} runs commit {node_commit} of dpbench, the driver {driver_commit}: check out the same "
            "commit on every node (and restart its `ray start`), then resume with --retry-failed"
        )
    return ""


def _log(message: str) -> dict:
    return {"event": "log", "message": message}


# --- on the driver -----------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """A run the driver holds the lock of: queued in Ray, then running on a node, until its result is written."""

    index: int
    run: RunSpec
    lock: RunLock
    started: float  # submitted, then when a node took it: the rows' started_at
    ref: Any = None
    attempt: str = ""
    attempts: int = 0
    node: str = ""
    host: dict[str, str] | None = None  # the node's provenance for the rows (hardware, git commit)
    events: list[dict] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # attempts whose events came: a late batch of an old one is dropped


@dataclass(frozen=True)
class Tally:
    """The whole sweep at a glance, as the progress line shows it."""

    total: int
    queued: int
    running: int
    done: int
    failed: int


class RayRunner(Runner):
    """Executes a suite's runs as Ray tasks, as many at once as the cluster has room for."""

    def __init__(
        self,
        results_dir: Path,
        *,
        address: str | None = None,
        retries: int = DEFAULT_RETRIES,
        on_tally: Callable[[Tally], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(results_dir, **kwargs)
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address = address
        self.retries = retries
        self.on_tally = on_tally
        self._ray: Any = None
        self._sink: Any = None
        self._task: Any = None
        self._largest: dict[str, float] = {}
        self._commit = _git_commit()

    def connect(self) -> None:
        """Join the cluster at `address` (None: Ray's default, RAY_ADDRESS or a local `ray start`, else a
        private local instance); raises RayUnavailable with what to do."""
        ray = _ray()
        _check_reachable(self.address)
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = self.address or "the default address"
                raise RayUnavailable(
                    f"no Ray cluster at {where}: {e}\nStart one with `ray start --head` (see the README, "
                    "'Sweeps on a Ray cluster') or drop --address to run a local Ray instance."
                ) from e
        self._ray = ray
        self._sink = (
            ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(EventSink)
            .options(scheduling_strategy=_on_head_node(ray))
            .remote()
        )
        self._task = ray.remote(execute_on_node)
        try:  # the sink is up before the first run starts, so no run's first events wait for it
            ray.get(self._sink.take.remote(), timeout=120)
        except ray.exceptions.RayError as e:
            raise RayUnavailable(f"the Ray cluster could not start the driver's event sink: {e}") from e

    def run_suite(
        self,
        suite: Suite,
        *,
        force: bool = False,
        retry_failed: bool = False,
        on_start: Callable[[int, RunSpec], None] | None = None,
    ) -> list[Outcome]:
        """Every run of the suite, submitted at once; results written as tasks finish. Runs another `bench run`
        on the same folder holds are waited for at the end, as locally. Raises SweepInterrupted on Ctrl-C (the
        running runs are written as `interrupted`, queued ones not at all) and ResultWriteError when a result
        cannot be written; both carry the outcomes so far."""
        if self._ray is None:
            self.connect()
        self._largest = self._largest_node()
        total = len(suite.runs)
        limits = (self.timeout or suite.timeout, self.memory_limit_gb or suite.memory_limit_gb)
        done: dict[int, Outcome] = {}
        slots: dict[str, _Slot] = {}
        deferred: list[tuple[int, RunSpec, tuple | None]] = []
        try:
            for i, run in enumerate(suite.runs, 1):
                stamp = _stamp(result_path(self.results_dir, run.suite, run.run_id))
                claim = self._claim(i, total, run, force, retry_failed)
                if isinstance(claim, Outcome):
                    done[i] = claim
                elif claim is None:
                    deferred.append((i, run, stamp))
                else:
                    self._submit_locked(i, total, run, claim, stamp, limits, slots, done)
            self._drain(slots, done, total)
            for i, run, stamp in deferred:
                self._submit_locked(i, total, run, self._wait_for_lock(i, total, run), stamp, limits, slots, done)
                self._drain(slots, done, total)
        except KeyboardInterrupt as e:
            stopped = self._interrupt(slots, str(e) or "interrupted by the user")
            outcomes = [done[k] for k in sorted(done)]
            raise SweepInterrupted(outcomes, stopped[0] if stopped else None, str(e), stopped) from e
        except ResultWriteError as e:
            self._cancel(slots)
            e.outcomes = [done[k] for k in sorted(done)]
            raise
        return [done[k] for k in sorted(done)]

    def _submit_locked(
        self,
        i: int,
        total: int,
        run: RunSpec,
        lock: RunLock,
        stamp: tuple | None,
        limits: tuple[float, float | None],
        slots: dict[str, _Slot],
        done: dict[int, Outcome],
    ) -> None:
        """Submit a run whose lock this process holds, unless another `bench run` finished it since `stamp`, or
        no node of the cluster could ever hold it (then it fails at once instead of waiting forever)."""
        path = result_path(self.results_dir, run.suite, run.run_id)
        label = describe_run(run)
        if _stamp(path) != stamp:
            status = read_status(path)
            if status in FINAL:
                lock.release()
                self.log(f"[{i}/{total}] {status} {label} (run by another bench run)")
                done[i] = Outcome(run, status, "", path, skipped=True, elsewhere=True)
                return
        remove_stale_temp_files(path)
        slot = _Slot(i, run, lock, time.time())
        unplaceable = self._unplaceable(run)
        if unplaceable:
            self._record(slot, "failed", unplaceable, [], None, total, done)
            return
        timeout, memory_limit_gb = limits
        task = self._task.options(
            num_cpus=run.perf.threads, num_gpus=run.perf.gpus, max_retries=self.retries, retry_exceptions=False
        )
        job = {"run": run.to_dict(), "git_commit": self._commit}
        slot.ref = task.remote(job, self.env, timeout, memory_limit_gb, self._sink)
        slots[run.run_id] = slot
        self.log(f"[{i}/{total}] queued {label}")

    def _largest_node(self) -> dict[str, float]:
        """The most CPUs and GPUs any live node of the cluster has, as the sweep starts."""
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        return {r: max((n.get(r, 0) for n in nodes), default=0) for r in ("CPU", "GPU")}

    def _unplaceable(self, run: RunSpec) -> str:
        """Why no node of the cluster can run `run` (more CPUs or GPUs than any node has), else ""."""
        need = {"CPU": run.perf.threads, "GPU": run.perf.gpus}
        for resource, amount in need.items():
            largest = self._largest[resource]
            if amount > largest:
                return (
                    f"no node of the Ray cluster has {amount:g} {resource}s for this run (the largest has "
                    f"{largest:g}); set threads/perf.gpus in the suite or add a larger node"
                )
        return ""

    def _drain(self, slots: dict[str, _Slot], done: dict[int, Outcome], total: int) -> None:
        """Follow the submitted runs until every one has its result written."""
        while slots:
            by_ref = {s.ref: s for s in slots.values()}
            ready, _ = self._ray.wait(list(by_ref), num_returns=len(by_ref), timeout=POLL_S)
            self._take_events(slots, total)
            for ref in ready:
                slot = by_ref[ref]
                self._finish(slot, total, done)
                del slots[slot.run.run_id]
            self._tally(slots, done, total)  # once a poll: per run, it would cost O(runs²) on a large grid

    def _take_events(self, slots: dict[str, _Slot], total: int) -> None:
        try:
            batches = self._ray.get(self._sink.take.remote(), timeout=30)
        except self._ray.exceptions.RayError:  # the sink is restarting: progress resumes, results are not affected
            return
        for run_id, attempt, events in batches:
            slot = slots.get(run_id)
            if slot is None:
                continue
            if attempt != slot.attempt:
                if attempt in slot.seen:
                    continue
                slot.seen.add(attempt)
                slot.attempt, slot.events = attempt, []
                slot.attempts += 1
            for e in events:
                self._on_event(slot, e, total)

    def _on_event(self, slot: _Slot, event: dict, total: int) -> None:
        label = describe_run(slot.run)
        kind = event["event"]
        if kind == "node":
            slot.node = event["node"]
            slot.started = event.get("time", slot.started)
            slot.host = {k: event[k] for k in ("hardware", "git_commit")}
            again = f" (attempt {slot.attempts} of {self.retries + 1})" if slot.attempts > 1 else ""
            self.log(f"[{slot.index}/{total}] run {label} on {slot.node}{again}")
        elif kind == "log":
            self.log(f"  [{slot.node}] {event['message']}")
        else:
            slot.events.append(event)
            if self.on_progress:
                self.on_progress(slot.run, event)

    def _finish(self, slot: _Slot, total: int, done: dict[int, Outcome]) -> None:
        ray = self._ray
        try:
            result = ray.get(slot.ref)
        except ray.exceptions.OutOfMemoryError as e:
            error = f"Ray's memory monitor killed the task: {_first_lines(e)}"
            self._record(slot, "oom", error, slot.events, slot.host, total, done)
            return
        except ray.exceptions.RayError as e:
            attempts = f"{max(slot.attempts, 1)} attempt{'s' if slot.attempts > 1 else ''}"
            error = (
                f"the Ray task failed after {attempts} (retries: {self.retries})"
                f"{f', last on node {slot.node}' if slot.node else ''}: {type(e).__name__}: {_first_lines(e)}"
            )
            self._record(slot, "failed", error, slot.events, slot.host, total, done)
            return
        host = {k: result[k] for k in ("hardware", "git_commit")}
        if "setup_error" in result:
            self._record(slot, "failed", result["setup_error"], [], host, total, done)
            return
        logs = self._logs_dir(slot.run) / f"{slot.run.run_id}.log"
        logs.write_text(f"# worker log from node {result['node']} (last {LOG_LINES} lines)\n{result['log']}\n")
        events = result["events"]
        status, error = _finish_status(
            slot.run, events, result["returncode"], result["timed_out"], result["over_memory"]
        )
        if status == "failed" and not any(e["event"] == "end" for e in events):
            error += "\n" + "\n".join(result["log"].splitlines()[-15:])
        self._record(slot, status, error, events, host, total, done)

    def _record(
        self,
        slot: _Slot,
        status: str,
        error: str,
        events: list[dict],
        host: dict[str, str] | None,
        total: int,
        done: dict[int, Outcome],
    ) -> None:
        """Write a run's result as the local executor does, then free its lock."""
        run = slot.run
        path = result_path(self.results_dir, run.suite, run.run_id)
        try:
            self._write(run, path, build_rows(run, events, status, error, slot.started, host))
        finally:
            slot.lock.release()
        done[slot.index] = Outcome(run, status, error, path)
        where = f" on {slot.node}" if slot.node else ""
        self.log(
            f"[{slot.index}/{total}] {status} {describe_run(run)}{where}"
            + (f": {error.splitlines()[0]}" if error else "")
        )

    def _tally(self, slots: dict[str, _Slot], done: dict[int, Outcome], total: int) -> None:
        if self.on_tally is None:
            return
        running = sum(1 for s in slots.values() if s.node)
        failed = sum(1 for o in done.values() if o.status not in ("ok", "unsupported") and not o.skipped)
        self.on_tally(Tally(total, len(slots) - running, running, len(done), failed))

    def _cancel(self, slots: dict[str, _Slot]) -> None:
        for slot in slots.values():
            try:
                self._ray.cancel(slot.ref, force=True)
            except Exception:  # noqa: BLE001 - a task that already ended cannot be cancelled; nothing to do
                pass

    def _interrupt(self, slots: dict[str, _Slot], reason: str) -> list[Outcome]:
        """Stop every task; the running runs are written as `interrupted` with their epochs so far (resume runs
        them again), the queued ones are left without a result. Returns the interrupted runs' outcomes."""
        self._cancel(slots)
        try:
            self._take_events(slots, len(slots))
        except Exception:  # noqa: BLE001 - the cluster may be what went away; the events so far still count
            pass
        stopped = []
        for slot in sorted(slots.values(), key=lambda s: s.index):
            run = slot.run
            path = result_path(self.results_dir, run.suite, run.run_id)
            if slot.node:
                self._write(run, path, build_rows(run, slot.events, "interrupted", reason, slot.started, slot.host))
                stopped.append(Outcome(run, "interrupted", reason, path))
            slot.lock.release()
        slots.clear()
        return stopped


def _on_head_node(ray: Any) -> Any:
    """Keep the event sink on the head node, which lives as long as the cluster (a worker node may be lost mid
    sweep); soft, so a cluster whose head cannot take it still works (and a restarted sink only loses progress
    lines: results come back with the tasks)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next(
        (n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n["Resources"]), None
    )
    return NodeAffinitySchedulingStrategy(node_id=head, soft=True) if head else "DEFAULT"


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds where nothing listens at HOST:PORT: Ray itself retries for minutes before it gives up."""
    if not address or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailable(f"--address {address!r}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailable(
            f"no Ray cluster at {address}: {e}\nStart its head with `ray start --head --port={port}` "
            "(see the README, 'Sweeps on a Ray cluster'), or check the address and the firewall."
        ) from e


def _first_lines(e: BaseException, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in str(e).strip().splitlines()[:lines] if line.strip())
