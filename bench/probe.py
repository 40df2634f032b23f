"""`python -m bench.probe REQUEST.json`: drive a backend on fixed inputs for tests/conformance.

Each case builds the backend from the core's canonical weights, optionally records the
logits of a fixed input and reference per-example gradient norms, then takes the given
steps and records the parameters after each. A federated case (its run has `federated`)
lists `clients`, played in turn as the core's rounds do: set the given global weights,
optionally record logits, train locally, record stats, compilations and parameters.
Runs inside the backend's environment.

A case that only reads (logits and/or norms, no steps or clients) leaves the backend as
built, so the next case, when it builds the same thing (run, input shape, classes,
physical batch size), takes that backend instead of building it again: a predict before
training is what a run's evaluation does too. Beside the outputs, `<output>.timings.json`
says how long each case took and the process's peak memory, for whoever sizes the tests.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from bench.backend import Backend, create_backend
from bench.models import build_spec, init_params
from bench.spec import RunSpec


def _build_key(case: dict) -> str:
    """What a build depends on: two cases with the same key build the same backend."""
    return json.dumps([case[k] for k in ("run", "input_shape", "num_classes", "physical_batch_size")], sort_keys=True)


def _reads_only(case: dict) -> bool:
    """The case leaves the backend as built: no training steps, no federated clients."""
    return not case.get("steps") and not case.get("clients")


def build_case(case: dict) -> Backend:
    """A fresh backend built for `case` from the core's canonical weights."""
    run = RunSpec.from_dict(case["run"])
    spec = build_spec(run.model, tuple(case["input_shape"]), case["num_classes"])
    backend = create_backend(run.backend)
    backend.build(run, spec, init_params(spec, run.seed), physical_batch_size=case["physical_batch_size"])
    return backend


def run_case(case: dict, inputs: dict[str, np.ndarray], backend: Backend | None = None) -> dict[str, np.ndarray]:
    """Outputs of one case; `backend`, when given, is one built for this case and not trained yet."""
    if backend is None:
        backend = build_case(case)
    cid = case["id"]
    out: dict[str, np.ndarray] = {}
    if case.get("logits"):
        out[f"{cid}/logits"] = np.asarray(backend.predict(inputs[case["logits"]]))
    if case.get("norms"):
        x, y = (inputs[k] for k in case["norms"])
        out[f"{cid}/norms"] = np.asarray(backend.per_example_grad_norms(x, y))
    out.update(run_clients(backend, cid, case.get("clients", []), inputs))
    for k, step in enumerate(case.get("steps", []), 1):
        stats = backend.train_step(inputs[step["x"]], inputs[step["y"]], inputs[step["mask"]])
        out[f"{cid}/step{k}/stats"] = np.array([stats.loss, stats.accuracy, stats.examples], np.float64)
        for name, value in backend.params().items():
            out[f"{cid}/step{k}/{name}"] = np.asarray(value)
    return out


def run_clients(backend: Backend, cid: str, clients: list[dict], inputs: dict[str, np.ndarray]) -> dict:
    """Federated clients: each sets the weights stored under its `params` prefix, then trains on x, y, mask."""
    out: dict[str, np.ndarray] = {}
    for k, client in enumerate(clients, 1):
        prefix, key = f"{client['params']}/", f"{cid}/client{k}"
        backend.set_params({name[len(prefix) :]: v for name, v in inputs.items() if name.startswith(prefix)})
        if client.get("logits"):
            out[f"{key}/logits"] = np.asarray(backend.predict(inputs[client["logits"]]))
        stats = backend.local_train(inputs[client["x"]], inputs[client["y"]], inputs[client["mask"]])
        out[f"{key}/stats"] = np.array([stats.loss, stats.accuracy, stats.examples], np.float64)
        compilations = backend.compilations()
        out[f"{key}/compilations"] = np.array(-1 if compilations is None else compilations)
        for name, value in backend.params().items():
            out[f"{key}/params/{name}"] = np.asarray(value)
    return out


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    with np.load(request["inputs"]) as f:
        inputs = {k: f[k] for k in f.files}
    out: dict[str, np.ndarray] = {}
    errors = {}
    seconds: dict[str, float] = {}
    kept: tuple[str, Backend] | None = None  # (build key, backend) left untrained by a reading case
    for case in request["cases"]:
        start = time.perf_counter()
        key = _build_key(case)
        backend = kept[1] if kept is not None and kept[0] == key else None
        kept = None
        try:
            if backend is None:
                backend = build_case(case)
            out.update(run_case(case, inputs, backend))
            if _reads_only(case):
                kept = (key, backend)
        except Exception as e:  # one unsupported case must not hide the others
            errors[case["id"]] = f"{type(e).__name__}: {e}"
        seconds[case["id"]] = round(time.perf_counter() - start, 3)
    np.savez(request["output"], **out)
    output = Path(request["output"])
    output.with_suffix(".errors.json").write_text(json.dumps(errors))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    output.with_suffix(".timings.json").write_text(json.dumps({"seconds": seconds, "peak_rss_mb": round(peak_mb)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
