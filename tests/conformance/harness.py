"""Drive every installed backend on identical inputs through `bench.probe`, in its own env.

`probe_once` runs a probe once per test session however many pytest-xdist workers ask for it: the first takes a
lock and runs it, the others wait for its files. Probes share one JAX compilation cache per session, so a case
that builds what an earlier case built (the same step, other data) loads the compiled step instead of compiling
it again; a fresh session starts with an empty cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.backend import backend_names, get_backend_info
from bench.envs import PROJECT_ROOT, env_python, is_ready
from bench.spec import DatasetSpec, DPConfig, OptimizerSpec, RunSpec, TrainConfig

REFERENCE = "jax:vmap"
PHYSICAL = 8
REAL_ROWS = 5  # of PHYSICAL; the expected batch size below is 6, so dividing by 5 is caught
EXPECTED_BATCH = 6
ROW_SCALES = np.array([0.2, 0.5, 1.0, 2.0, 4.0], np.float32)
DATASET_SIZE = 1000
NUM_CLASSES = 10

# (case name, zoo model, input shape)
MODELS = [
    ("mlp", "mlp", (28, 28, 1)),
    ("cnn-mnist", "cnn-mnist", (28, 28, 1)),
    ("cnn-tanh", "cnn-tanh", (28, 28, 1)),
    ("cnn-tanh-cifar", "cnn-tanh", (32, 32, 3)),
    ("resnet18-gn", "resnet18-gn", (32, 32, 3)),
]


def python_for(backend: str) -> str | None:
    """The interpreter of a backend's environment; None when it is not installed."""
    if os.environ.get("BENCH_CONFORMANCE_ENV") == "current":
        return sys.executable
    return str(env_python(backend)) if is_ready(backend) else None


def installed_labels() -> list[str]:
    """Every variant of every installed backend; `BENCH_CONFORMANCE_BACKENDS=jax,opacus` narrows it."""
    wanted = [b for b in os.environ.get("BENCH_CONFORMANCE_BACKENDS", "").split(",") if b]
    return [
        f"{name}:{variant}"
        for name in backend_names()
        if python_for(name) and (not wanted or name in wanted)
        for variant in get_backend_info(name).variants
    ]


def base_run(label: str, model: str, **dp_kwargs) -> RunSpec:
    backend, variant = label.split(":")
    return RunSpec(
        suite="conformance",
        workload=model,
        dataset=DatasetSpec(name="synthetic"),
        model=model,
        train=TrainConfig(epochs=1, batch_size=EXPECTED_BATCH),
        dp=DPConfig(**dp_kwargs),
        backend=backend,
        variant=variant,
        seed=0,
        dataset_size=DATASET_SIZE,
    )


def with_optimizer(run: RunSpec, **kwargs) -> RunSpec:
    return replace(run, train=replace(run.train, optimizer=OptimizerSpec(**kwargs)))


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Per model: logits input, three padded batches with garbage (and zero) padding, an empty batch."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for name, _, shape in MODELS:
        arrays[f"{name}/logits_x"] = rng.normal(size=(16, *shape)).astype(np.float32)
        for k in range(3):
            x = rng.normal(size=(PHYSICAL, *shape)).astype(np.float32)
            x[:REAL_ROWS] *= ROW_SCALES.reshape(-1, *[1] * len(shape))  # spread the gradient norms
            x[REAL_ROWS:] = rng.normal(scale=50.0, size=x[REAL_ROWS:].shape)  # garbage in padded rows
            zero_padded = x.copy()
            zero_padded[REAL_ROWS:] = 0
            y = rng.integers(0, NUM_CLASSES, size=PHYSICAL)
            arrays[f"{name}/x{k}"] = x
            arrays[f"{name}/x{k}_zero"] = zero_padded
            arrays[f"{name}/y{k}"] = y.astype(np.int64)
        mask = np.zeros(PHYSICAL, np.float32)
        mask[:REAL_ROWS] = 1
        arrays[f"{name}/mask"] = mask
        arrays[f"{name}/empty_mask"] = np.zeros(PHYSICAL, np.float32)
    return arrays


def run_probe(
    label: str, cases: list[dict], inputs: Path, workdir: Path, jax_cache: Path | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """`bench.probe` on `cases` in the backend's environment: (arrays, errors by case id); `jax_cache`: the
    folder of JAX's persistent compilation cache (default: the `jax-cache` folder beside `workdir`)."""
    backend = label.split(":")[0]
    python = python_for(backend)
    tag = label.replace(":", "_")
    workdir.mkdir(parents=True, exist_ok=True)
    request = workdir / f"{tag}.json"
    output = workdir / f"{tag}.npz"
    request.write_text(json.dumps({"cases": cases, "inputs": str(inputs), "output": str(output)}))
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "BENCH_THREADS": "2",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "JAX_COMPILATION_CACHE_DIR": str(jax_cache or workdir.parent / "jax-cache"),
    }
    proc = subprocess.run(
        [python, "-m", "bench.probe", str(request)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"probe for {label} failed:\n{proc.stderr[-3000:]}")
    return load_probe(label, workdir)


def load_probe(label: str, workdir: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and errors a finished probe of `label` left in `workdir`."""
    output = workdir / f"{label.replace(':', '_')}.npz"
    with np.load(output) as f:
        out = {k: f[k] for k in f.files}
    return out, json.loads(output.with_suffix(".errors.json").read_text())


def shared_dir(tmp_path_factory) -> Path:
    """A folder of this test session that every pytest-xdist worker sees: the session's base temporary folder
    (a worker's own is a subfolder of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing), held across processes until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def slot(folder: Path, slots: int) -> Iterator[None]:
    """One of `slots` machine-wide places (lock files in `folder`): at most `slots` holders at once."""
    folder.mkdir(parents=True, exist_ok=True)
    fds = [os.open(folder / f"slot{k}.lock", os.O_RDWR | os.O_CREAT, 0o644) for k in range(slots)]
    held = None
    try:
        while held is None:
            for fd in fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                held = fd
                break
            else:
                time.sleep(0.2)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def probe_once(
    label: str, cases: list[dict], inputs: Path, workdir: Path, heavy_slots: tuple[Path, int] | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """run_probe in `workdir`, once per session: a process that finds it done, or being run by another process
    (an xdist worker), reads its results. `heavy_slots` (folder, n): run it holding one of n slots there, so that
    no more than n such memory-hungry probes run at once."""
    done = workdir / "done"
    with locked(workdir.parent / f"{workdir.name}.lock"):
        if not done.exists():
            with slot(*heavy_slots) if heavy_slots else contextlib.nullcontext():
                run_probe(label, cases, inputs, workdir, jax_cache=workdir.parent / "jax-cache")
            done.touch()
    return load_probe(label, workdir)


def case(cid: str, run: RunSpec, shape: tuple[int, ...], **fields) -> dict:
    return {
        "id": cid,
        "run": run.to_dict(),
        "input_shape": list(shape),
        "num_classes": NUM_CLASSES,
        "physical_batch_size": PHYSICAL,
        **fields,
    }


def steps(name: str, mask: str = "mask", zero: bool = False, n: int = 3) -> list[dict]:
    suffix = "_zero" if zero else ""
    return [{"x": f"{name}/x{k}{suffix}", "y": f"{name}/y{k}", "mask": f"{name}/{mask}"} for k in range(n)]
