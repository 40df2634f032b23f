"""bench.worker in-process with a fake numpy backend: error classes, probe mode, unsupported workloads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from bench import worker
from bench.backend import StepStats, Unsupported
from bench.data.prepare import prepared_path
from bench.spec import DatasetSpec, DPConfig, RunSpec, TrainConfig
from bench.worker import classify_error, describe_error

DATASET = DatasetSpec(name="synthetic", train_size=200, test_size=40, shape=(4, 4, 1), num_classes=3)


class FakeBackend:
    """Counts steps; logits are zeros. `unsupported` makes build raise like a backend that cannot run a model."""

    name = "fake"
    variants = ("only",)

    def __init__(self, unsupported: bool = False):
        self.unsupported = unsupported
        self.steps = 0

    def versions(self) -> dict[str, str]:
        return {"fake": "1"}

    def build(self, run, model, init_params, *, physical_batch_size: int) -> None:
        if self.unsupported:
            raise Unsupported("fake:only has no per-example rule for this layer")

    def train_step(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> StepStats:
        self.steps += 1
        return StepStats(loss=1.0, accuracy=0.5, examples=int(mask.sum()))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), 3), np.float32)

    def params(self) -> dict[str, np.ndarray]:
        return {}

    def reported_epsilon(self, delta: float) -> float | None:
        return None

    def peak_memory_mb(self) -> float | None:
        return None

    def compilations(self) -> int | None:
        return None


def _job(tmp_path: Path, **extra) -> tuple[Path, Path]:
    run = RunSpec(
        suite="s",
        workload="w",
        dataset=DATASET,
        model="mlp",
        train=TrainConfig(epochs=2, batch_size=50),
        dp=DPConfig(noise_multiplier=1.0),
        backend="jax",
        variant="vmap",
        dataset_size=200,
    )
    events = tmp_path / "events.jsonl"
    job = tmp_path / "job.json"
    data = prepared_path(DATASET, root=tmp_path)
    job.write_text(json.dumps({"run": run.to_dict(), "data": str(data), "events": str(events), **extra}))
    return job, events


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def no_pinning(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() pins the process to `threads` CPUs: not the test process."""
    monkeypatch.setattr(worker, "pin_threads", lambda threads: None)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    backend = FakeBackend()
    monkeypatch.setattr(worker, "create_backend", lambda name: backend)
    return backend


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes."),
        RuntimeError("Out of memory while trying to allocate 32.00GiB"),
        type("ResourceExhaustedError", (Exception,), {})("{{function_node __wrapped__}} failed"),
        RuntimeError("ResourceExhausted: could not grow the arena"),
        RuntimeError("OOM when allocating tensor with shape[512,784] on /job:localhost"),
        RuntimeError("CUDA_ERROR_OOM"),
        RuntimeError("Failed to allocate request for 2.00GiB"),
        RuntimeError("torch.OutOfMemoryError: CUDA out of memory"),
        RuntimeError("numpy: Unable to allocate 3.1 GiB for an array"),
    ],
)
def test_out_of_memory_errors_of_every_framework_are_oom(exc):
    assert classify_error(exc) == "oom"


@pytest.mark.parametrize("message", ["shapes do not match", "zoom level 3 is not supported", "room for one more"])
def test_other_errors_are_failures(message):
    assert classify_error(ValueError(message)) == "failed"


def test_unsupported_is_its_own_status():
    assert classify_error(Unsupported("no rule for GroupNorm")) == "unsupported"


def test_unsupported_build_ends_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(worker, "create_backend", lambda name: FakeBackend(unsupported=True))
    job, events = _job(tmp_path)
    assert worker.main([str(job)]) == 0
    end = _events(events)[-1]
    assert end["event"] == "end" and end["status"] == "unsupported"
    assert "no per-example rule" in end["error"]


def test_probe_times_steps_and_does_not_train(tmp_path, fake):
    job, events = _job(tmp_path, max_steps=3)
    assert worker.main([str(job)]) == 0
    evs = _events(events)
    assert [e["event"] for e in evs] == ["start", "built", "probe", "end"]
    probe = evs[2]
    assert probe["steps"] == 3 and fake.steps == 4  # one warm-up step and three timed ones
    assert probe["build_seconds"] >= 0 and probe["first_step_seconds"] > 0 and probe["step_seconds"] > 0
    assert evs[-1]["status"] == "ok"


def test_a_job_without_max_steps_trains_every_epoch(tmp_path, fake):
    job, events = _job(tmp_path)
    assert worker.main([str(job)]) == 0
    evs = _events(events)
    assert [e["epoch"] for e in evs if e["event"] == "epoch"] == [1, 2]
    assert not any(e["event"] == "probe" for e in evs)
    assert fake.steps == 8  # 2 epochs x round(200 / 50) steps


def test_oom_error_leads_with_the_allocation_line():
    exc = RuntimeError(
        "Graph execution error:\n\nDetected at node pfor/Tile\n"
        "OOM when allocating tensor with shape[2232,2232,5,5,32] and type float\nHint: ..."
    )
    text = describe_error(exc, "oom")
    assert (
        text.splitlines()[0] == "RuntimeError: OOM when allocating tensor with shape[2232,2232,5,5,32] and type float"
    )
    assert "Graph execution error" in text
    assert describe_error(ValueError("bad\nthing"), "failed") == "ValueError: bad\nthing"


class _RecordingSource:
    """A batch source that records which thread drew each step's batch."""

    def __init__(self):
        self.threads: dict[int, str] = {}

    def batch(self, step: int):
        self.threads[step] = threading.current_thread().name
        return np.full(2, step), np.zeros(2), np.ones(2)


def test_prefetched_yields_every_step_in_order_drawn_off_the_main_thread():
    source = _RecordingSource()
    out = list(worker.prefetched(source, range(3, 8)))
    assert [step for step, _ in out] == [3, 4, 5, 6, 7]
    assert all((batch[0] == step).all() for step, batch in out)
    assert sorted(source.threads) == [3, 4, 5, 6, 7]
    assert all(name.startswith("batches") for name in source.threads.values())
    assert list(worker.prefetched(source, range(0))) == []


def test_prefetched_batches_equal_the_inline_ones():
    """The source is pure in (seed, step): drawing ahead on another thread changes no batch."""
    from bench.data.prepare import Dataset

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 4, 4, 1)).astype(np.float32), rng.integers(0, 3, 200)
    run = RunSpec(
        suite="s",
        workload="w",
        dataset=DatasetSpec(name="synthetic", shape=(4, 4, 1), num_classes=3, augment=True),
        model="mlp",
        train=TrainConfig(epochs=1, batch_size=50),
        dp=DPConfig(noise_multiplier=1.0),
        backend="jax",
        dataset_size=200,
    )
    source = worker.BatchSource(run, Dataset(x, y, x[:10], y[:10], 3))
    for step, (x, y, mask) in worker.prefetched(source, range(6)):
        ex, ey, em = source.batch(step)
        assert np.array_equal(x, ex) and np.array_equal(y, ey) and np.array_equal(mask, em)


def test_epoch_events_count_the_steps_done(tmp_path, fake):
    job, events = _job(tmp_path)
    assert worker.main([str(job)]) == 0
    assert [e["steps"] for e in _events(events) if e["event"] == "epoch"] == [4, 8]
