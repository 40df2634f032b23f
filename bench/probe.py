"""`python -m bench.probe REQUEST.json`: drive a backend on fixed inputs for tests/conformance.

Each case builds the backend from the core's canonical weights, optionally records the
logits of a fixed input and reference per-example gradient norms, then takes the given
steps and records the parameters after each. A federated case (its run has `federated`)
lists `clients`, played in turn as the core's rounds do: set the given global weights,
optionally record logits, train locally, record stats, compilations and parameters.
Runs inside the backend's environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bench.backend import Backend, create_backend
from bench.models import build_spec, init_params
from bench.spec import RunSpec


def run_case(case: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    run = RunSpec.from_dict(case["run"])
    spec = build_spec(run.model, tuple(case["input_shape"]), case["num_classes"])
    backend = create_backend(run.backend)
    backend.build(run, spec, init_params(spec, run.seed), physical_batch_size=case["physical_batch_size"])
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
    for case in request["cases"]:
        try:
            out.update(run_case(case, inputs))
        except Exception as e:  # one unsupported case must not hide the others
            errors[case["id"]] = f"{type(e).__name__}: {e}"
    np.savez(request["output"], **out)
    Path(request["output"]).with_suffix(".errors.json").write_text(json.dumps(errors))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
