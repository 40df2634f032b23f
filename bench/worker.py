"""`python -m bench.worker RUN.json`: run ONE RunSpec inside its backend's environment.

The core owns everything but the DP-SGD step: it loads the prepared data, draws the
batches (Poisson or shuffle), augments and pads them, creates the initial weights and
times the backend's steps. Progress and results go to a JSON-lines events file, never
stdout, because frameworks print.

A job with `"max_steps": N` is a probe: build, one warm-up step and N timed steps,
reported as one "probe" event, without evaluation (used by `bench run --dry-run --probe`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.audit.canaries import Canaries, with_canaries
from bench.audit.canaries import scores as canary_scores
from bench.backend import Backend, Diverged, Unsupported, create_backend
from bench.data.prepare import Dataset, load_prepared
from bench.data.sampling import augment, pad_batch, physical_batch_size, poisson_batch, shuffle_batch
from bench.models import build_spec, init_params
from bench.spec import RunSpec

OOM_MARKERS = (
    r"resource_?exhausted",
    r"out of memory",
    r"outofmemory",
    r"(?<![a-z])oom(?![a-z])",
    r"unable to allocate",
    r"failed to allocate",
)
_OOM_RE = re.compile("|".join(OOM_MARKERS), re.IGNORECASE)
PROGRESS_INTERVAL_S = 0.5
CLEAN_ENDINGS = ("diverged", "unsupported")  # a result about the workload, not a crash: exit code 0


class Events:
    """Append-only JSON lines, flushed per event so the runner can follow along."""

    def __init__(self, path: str | Path):
        self._f = open(path, "a", buffering=1)

    def emit(self, event: str, **fields: Any) -> None:
        self._f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        self._f.flush()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# Thread counts that the frameworks read at import: the runner sets them all to the run's `threads`.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "BENCH_THREADS",
)


def pin_threads(threads: int) -> None:
    """Restrict the process to `threads` CPUs (thread env vars are set by the runner)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])
    except (AttributeError, OSError):
        pass


class BatchSource:
    """The core's per-step work: sample, gather, augment, pad. Pure in (seed, step)."""

    def __init__(self, run: RunSpec, data: Dataset):
        self.run = run
        self.data = data
        self.n = len(data.y_train)
        poisson = run.dp.sampling == "poisson"
        self.physical = run.perf.physical_batch_size or physical_batch_size(
            run.train.batch_size, run.sample_rate, poisson
        )

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        run = self.run
        if run.dp.sampling == "poisson":
            idx = poisson_batch(run.seed, step, self.n, run.sample_rate)
        else:
            idx = shuffle_batch(run.seed, step, self.n, run.train.batch_size)
        x = self.data.x_train[idx]
        if run.dataset.augment:
            x = augment(x, run.seed, step)
        return pad_batch(x, self.data.y_train[idx], self.physical)


Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def prefetched(source: BatchSource, steps: range) -> Iterator[tuple[int, Batch]]:
    """(step, batch) for `steps`, each batch drawn on a background thread while the backend runs the one before.

    The batches are the ones drawn inline (the source is pure in (seed, step)); the core's work (sampling,
    gathering, augmentation, padding) then hides behind the backend's step instead of adding to the epoch.
    On a GPU, where a step takes milliseconds, it was a third of the epoch.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches") as pool:
        pending = pool.submit(source.batch, steps[0]) if steps else None
        for i, step in enumerate(steps):
            batch = pending.result()
            if i + 1 < len(steps):
                pending = pool.submit(source.batch, steps[i + 1])
            yield step, batch


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(y)), y]


def evaluate(backend: Backend, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy, computed by the core from the backend's logits."""
    loss = correct = 0.0
    for i in range(0, len(y), batch_size):
        logits = np.asarray(backend.predict(x[i : i + batch_size]), dtype=np.float64)
        loss += float(cross_entropy(logits, y[i : i + batch_size]).sum())
        correct += float((logits.argmax(-1) == y[i : i + batch_size]).sum())
    return loss / len(y), correct / len(y)


def build(run: RunSpec, data: Dataset, backend: Backend, events: Events) -> tuple[BatchSource, float]:
    """Build the backend from the canonical weights; returns the batch source and the build time."""
    spec = build_spec(run.model, data.input_shape, data.num_classes)
    source = BatchSource(run, data)
    t0 = time.perf_counter()
    backend.build(run, spec, init_params(spec, run.seed), physical_batch_size=source.physical)
    seconds = time.perf_counter() - t0
    events.emit("built", seconds=seconds, versions=backend.versions())
    return source, seconds


def _timed_step(backend: Backend, source: BatchSource, step: int) -> float:
    x, y, mask = source.batch(step)
    t = time.perf_counter()
    backend.train_step(x, y, mask)
    return time.perf_counter() - t


def probe(run: RunSpec, data: Dataset, backend: Backend, events: Events, steps: int) -> None:
    """Time the build, the first (compiling) step and `steps` more: the cost of a step, without training."""
    source, build_seconds = build(run, data, backend, events)
    first = _timed_step(backend, source, 0)
    times = [_timed_step(backend, source, step) for step in range(1, steps + 1)]
    events.emit(
        "probe",
        build_seconds=build_seconds,
        first_step_seconds=first,
        step_seconds=statistics.median(times) if times else first,
        steps=steps,
    )


def train(run: RunSpec, data: Dataset, backend: Backend, events: Events) -> None:
    if run.federated is not None:
        from bench.federated.rounds import train_federated

        return train_federated(
            run,
            data,
            backend,
            events,
            evaluate=lambda b: evaluate(b, data.x_test, data.y_test, run.train.eval_batch_size),
            peak_memory_mb=lambda: backend.peak_memory_mb() or _peak_rss_mb(),
        )
    source, _ = build(run, data, backend, events)
    batches = prefetched(source, range(run.total_steps))
    for epoch in range(1, run.train.epochs + 1):
        epoch_start = time.perf_counter()
        train_seconds = 0.0
        loss_sum = correct = examples = 0.0
        last_progress = 0.0
        for _ in range(run.steps_per_epoch):
            step, (x, y, mask) = next(batches)
            t = time.perf_counter()
            stats = backend.train_step(x, y, mask)
            dt = time.perf_counter() - t
            train_seconds += dt
            if step == 0:
                events.emit("compiled", seconds=dt)
            if stats.examples and not math.isfinite(stats.loss):
                raise Diverged(f"non-finite training loss {stats.loss} at step {step}")
            loss_sum += stats.loss * stats.examples
            correct += stats.accuracy * stats.examples
            examples += stats.examples
            if time.perf_counter() - last_progress > PROGRESS_INTERVAL_S:
                last_progress = time.perf_counter()
                events.emit("progress", epoch=epoch, step=step + 1, total_steps=run.total_steps)
        epoch_seconds = time.perf_counter() - epoch_start
        test_loss, test_acc = evaluate(backend, data.x_test, data.y_test, run.train.eval_batch_size)
        if not math.isfinite(test_loss):
            raise Diverged(f"non-finite test loss {test_loss} after epoch {epoch}")
        events.emit(
            "epoch",
            epoch=epoch,
            steps=step + 1,
            examples=int(examples),
            train_loss=loss_sum / examples if examples else float("nan"),
            train_accuracy=correct / examples if examples else float("nan"),
            test_loss=test_loss,
            test_accuracy=test_acc,
            train_seconds=train_seconds,
            epoch_seconds=epoch_seconds,
            physical_batch_size=source.physical,
            peak_memory_mb=backend.peak_memory_mb() or _peak_rss_mb(),
            compilations=backend.compilations(),
            epsilon_reported=backend.reported_epsilon(run.dp.delta) if run.dp.enabled else None,
        )


def emit_canary_scores(run: RunSpec, backend: Backend, canaries: Canaries, events: Events) -> None:
    """The one-run audit's evidence: every canary's score under the final model, and which were trained on."""
    bs = run.train.eval_batch_size
    logits = np.concatenate(
        [np.asarray(backend.predict(canaries.x[i : i + bs])) for i in range(0, len(canaries.y), bs)]
    )
    events.emit(
        "canaries",
        kind=run.audit.kind,
        scores=canary_scores(logits, canaries.y).tolist(),
        included=canaries.included.tolist(),
    )


def classify_error(exc: BaseException) -> str:
    if isinstance(exc, Diverged):
        return "diverged"
    if isinstance(exc, Unsupported):
        return "unsupported"
    if isinstance(exc, MemoryError) or _OOM_RE.search(f"{type(exc).__name__}: {exc}"):
        return "oom"
    return "failed"


def describe_error(exc: BaseException, status: str) -> str:
    """ "Type: message", with the line that names the allocation first for an oom (TensorFlow's
    first line is a generic "Graph execution error:")."""
    text = f"{type(exc).__name__}: {exc}"
    if status == "oom":
        line = next((ln.strip() for ln in str(exc).splitlines()[1:] if _OOM_RE.search(ln)), None)
        if line:
            return f"{type(exc).__name__}: {line}\n{text}"
    return text


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.worker RUN.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    run = RunSpec.from_dict(job["run"])
    events = Events(job["events"])
    pin_threads(run.perf.threads)
    events.emit("start", pid=os.getpid(), python=platform.python_version(), machine=platform.machine())
    try:
        backend = create_backend(run.backend)
        data = load_prepared(job["data"])
        if job.get("max_steps") is not None and run.federated is not None:
            raise Unsupported("a probe times DP-SGD steps; a federated run has rounds of local training instead")
        canaries = None
        if run.audit is not None:
            data, canaries = with_canaries(data, run.audit, run.seed)
            if len(data.y_train) != run.dataset_size:
                raise ValueError(
                    f"the training set with canaries has {len(data.y_train)} examples, the run {run.dataset_size}"
                )
        if job.get("max_steps") is not None:
            probe(run, data, backend, events, int(job["max_steps"]))
        else:
            train(run, data, backend, events)
            if canaries is not None:
                emit_canary_scores(run, backend, canaries, events)
    except BaseException as exc:  # every ending becomes a result, KeyboardInterrupt included
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else classify_error(exc)
        events.emit("end", status=status, error=describe_error(exc, status), traceback=traceback.format_exc())
        return 0 if status in CLEAN_ENDINGS else 1
    events.emit("end", status="ok", error="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
