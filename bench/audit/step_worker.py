"""`python -m bench.audit.step_worker REQUEST.json`: the trials of a step audit, inside a backend's environment.

White-box, one DP-SGD step (after Nasr et al. 2021, 2023): from the same canonical weights, a fixed batch B and
a canary z whose gradient is far larger than the clip norm C.

1. With sigma = 0 (deterministic) the backend steps once on B + z and once on B alone: the updates differ by
   d, the canary's clipped gradient scaled by the learning rate over the expected batch size. The canary may be
   a group of identical copies of z (add/remove of the group is then the neighbouring relation): with k copies
   the gap is k times larger and mu = k / sigma, which keeps mu near 1, where few trials measure it well.
2. With the run's sigma the backend takes `trials` steps from the same weights (plain SGD: no state carries
   over), each on B + z or on B alone with probability 1/2; each trial's score is the projection of its update
   minus B's noiseless update onto d / |d|. For a correct Gaussian step the scores are N(|d|, s^2) in and
   N(0, s^2) out, s the noise's standard deviation, so their standardised gap is mu = 1 / sigma.

Only the Backend API is used (build, set_params, train_step, params), so every backend, present and future,
is audited the same way. Batches are padded exactly as the core pads Poisson batches (`pad_batch`).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.backend import Backend, create_backend
from bench.data.sampling import pad_batch
from bench.models import build_spec, init_params
from bench.spec import RunSpec

# Stream tags of the audit's own draws (batch, canary, inclusion): a third element that no other stream of the core
# has, so none of these generators can coincide with another (numpy treats [a, b] and [a, b, 0] alike).
_BATCH_STREAM = (0xA0D1, 1)
_INCLUSION_STREAM = (0xA0D1, 2)
# The canary's input is this many times a typical input: its gradient dwarfs any clip norm a suite uses.
CANARY_SCALE = 30.0


def make_backend(run: RunSpec, target: str | None) -> Backend:
    """The run's backend, or (tests) the class named by `target` ("module:Class")."""
    if not target:
        return create_backend(run.backend)
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def audit_batches(
    shape: tuple[int, ...], num_classes: int, real_rows: int, copies: int, physical: int, seed: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The padded batches (x, y, mask) with the canary (B + `copies` rows of z) and without it (B alone)."""
    rng = np.random.default_rng([seed, *_BATCH_STREAM])
    x = rng.normal(size=(real_rows, *shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=real_rows).astype(np.int64)
    z = np.repeat((CANARY_SCALE * rng.normal(size=(1, *shape))).astype(np.float32), copies, axis=0)
    zy = np.repeat(rng.integers(0, num_classes, size=1).astype(np.int64), copies)
    with_canary = pad_batch(np.concatenate([x, z]), np.concatenate([y, zy]), physical)
    without = pad_batch(x, y, physical)
    return with_canary, without


def _flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(params[k], np.float64).ravel() for k in sorted(params)])


def _update(backend: Backend, init: dict[str, np.ndarray], flat_init: np.ndarray, batch: tuple) -> np.ndarray:
    backend.set_params(init)
    backend.train_step(*batch)
    return _flat(backend.params()) - flat_init


def run_trials(request: dict) -> dict[str, np.ndarray]:
    """Every array the orchestrator scores: trial scores, inclusion bits, |d| and the timing."""
    run = RunSpec.from_dict(request["run"])
    spec = build_spec(run.model, tuple(request["input_shape"]), request["num_classes"])
    init = init_params(spec, run.seed)
    flat_init = _flat(init)
    physical = int(request["physical_batch_size"])
    with_canary, without = audit_batches(
        spec.input_shape, spec.num_classes, int(request["real_rows"]), int(request["copies"]), physical, run.seed
    )
    t0 = time.perf_counter()
    noiseless = make_backend(run, request.get("target"))
    noiseless.build(replace(run, dp=replace(run.dp, noise_multiplier=0.0)), spec, init, physical_batch_size=physical)
    base = _update(noiseless, init, flat_init, without)
    d = _update(noiseless, init, flat_init, with_canary) - base
    del noiseless
    norm = float(np.linalg.norm(d))
    if not norm > 0:
        raise RuntimeError("the canary does not change the noiseless update (d = 0): nothing to audit")
    direction = d / norm
    backend = make_backend(run, request.get("target"))
    backend.build(run, spec, init, physical_batch_size=physical)
    build_seconds = time.perf_counter() - t0
    trials = int(request["trials"])
    included = np.random.default_rng([run.seed, *_INCLUSION_STREAM]).random(trials) < 0.5
    scores = np.empty(trials, np.float64)
    t1 = time.perf_counter()
    for k in range(trials):
        update = _update(backend, init, flat_init, with_canary if included[k] else without)
        scores[k] = float((update - base) @ direction)
    return {
        "scores": scores,
        "included": included,
        "d_norm": np.array(norm),
        "build_seconds": np.array(build_seconds),
        "trial_seconds": np.array((time.perf_counter() - t1) / max(trials, 1)),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.audit.step_worker REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    out = Path(request["output"])
    try:
        arrays = run_trials(request)
    except Exception as e:  # the orchestrator records it as the audit's error
        out.with_suffix(".error.txt").write_text(f"{type(e).__name__}: {e}")
        return 1
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
