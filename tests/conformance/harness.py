"""Drive every installed backend on identical inputs through `bench.probe`, in its own env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def run_probe(label: str, cases: list[dict], inputs: Path, workdir: Path) -> tuple[dict[str, np.ndarray], dict]:
    backend = label.split(":")[0]
    python = python_for(backend)
    tag = label.replace(":", "_")
    workdir.mkdir(parents=True, exist_ok=True)
    request = workdir / f"{tag}.json"
    output = workdir / f"{tag}.npz"
    request.write_text(json.dumps({"cases": cases, "inputs": str(inputs), "output": str(output)}))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "BENCH_THREADS": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [python, "-m", "bench.probe", str(request)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"probe for {label} failed:\n{proc.stderr[-3000:]}")
    with np.load(output) as f:
        out = {k: f[k] for k in f.files}
    return out, json.loads(output.with_suffix(".errors.json").read_text())


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
