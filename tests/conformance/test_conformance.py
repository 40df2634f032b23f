"""The identical-workload contract, proven across backends (../shared/DESIGN.md).

Every installed backend/variant is driven on the same canonical weights and batches and
compared with the JAX vmap reference: logits, one and three DP steps with sigma = 0
(clipping, summing, normalisation by the expected batch size, sgd+momentum+L2 and adam),
non-private steps, padded rows, and the noise of a DP step on an empty Poisson batch.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bench.models import build_spec, init_params, num_params
from tests.conformance import harness as h

pytestmark = pytest.mark.conformance

LABELS = h.installed_labels()
OTHERS = [label for label in LABELS if label != h.REFERENCE]
MODEL_NAMES = [name for name, _, _ in h.MODELS]
NOISE_SIGMA, NOISE_C, NOISE_LR = 1.0, 1.0, 1.0
# A batch larger than the physical size arrives as a multiple of it and is taken in chunks (the JAX backend
# adds chunk sums under lax.scan, a path a single chunk skips); one small and one convolutional model cover it.
CHUNKED_MODELS = ("mlp", "cnn-tanh")
CHUNK = h.PHYSICAL // 2

# fp32 tolerances: different kernels (XLA vs. oneDNN convolutions, summation orders)
# agree to ~1e-6 relative; a contract violation (wrong clip, divisor, layout) is >= 1e-2.
LOGITS_TOL = dict(rtol=1e-4, atol=1e-5)
PARAMS_TOL = dict(rtol=1e-4, atol=2e-6)
# ResNet-18 (11M parameters): torch's CPU float32 `norm(dim=...)` accumulates in float32,
# so Opacus' per-example norms are off by ~1e-5 relative and after three steps parameters
# differ by up to 1.5e-5 (JAX is 1.1e-7 from a float64 reference, Opacus 7.7e-7).
# Gradients then agree to ~5e-4; SGD (lr 0.1) turns that into 5e-5 of parameter, Adam
# (lr / eps = 1, see below) into 5e-4: the same gradient-level tolerance for both.
MODEL_PARAMS_TOL = {
    ("resnet18-gn", "sgd"): dict(rtol=1e-4, atol=5e-5),
    ("resnet18-gn", "nonprivate"): dict(rtol=1e-4, atol=5e-5),
    ("resnet18-gn", "adam"): dict(rtol=1e-4, atol=5e-4),
}
# After three Adam steps on ResNet-18 a few coordinates (0.03%) whose gradient is near zero
# differ by up to one learning rate: float32 noise decides the sign of m there. A contract
# violation (clip, divisor, noise, L2) moves most coordinates, so there we bound the share.
ILL_CONDITIONED = {("resnet18-gn", "adam", 3): 1e-3}
# Adam's g / (sqrt(v) + eps) turns float32 rounding of near-zero gradient coordinates
# (~1e-8) into a sizeable share of the learning rate, so a tiny eps makes the comparison
# chaotic (the same backend differs from itself by 1e-2 under a 1e-6 input change). A
# well-conditioned eps still checks the moments, bias correction and coupled L2.
ADAM_EPS = 1e-3
# Each backend/variant is probed in a few processes ("units", see _units), LANES at a time, before the first
# test: much of a probe's time is single-threaded tracing and XLA compilation; results do not depend on timing.
LANES = 2
# TF Privacy on ResNet-18 is memory-hungry: one process with the five XLA cases of keras-xla peaked at 14 GB RSS
# (bench.probe's timings file), 4-6 GB for one or two cases. Such units run in a process per case (or two) and at
# most HEAVY_SLOTS of them at once, whatever the number of xdist workers.
HEAVY_SLOTS = 2
HEAVY_MODELS = ("resnet18-gn",)


if h.REFERENCE not in LABELS:
    pytest.skip("the JAX reference environment is not installed (make setup)", allow_module_level=True)


def _shape(model_case: str) -> tuple[str, tuple[int, int, int]]:
    _, model, shape = next(m for m in h.MODELS if m[0] == model_case)
    return model, shape


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(the session's shared conformance folder, the inputs file in it, the inputs)."""
    workdir = h.shared_dir(tmp_path_factory) / "conformance"
    arrays = h.make_inputs()
    path = workdir / "inputs.npz"
    with h.locked(workdir / "inputs.lock"):
        if not path.exists():
            np.savez(workdir / "inputs.tmp.npz", **arrays)
            (workdir / "inputs.tmp.npz").rename(path)
    return workdir, path, arrays


@pytest.fixture(scope="session")
def clip_norms(inputs) -> dict[str, tuple[float, np.ndarray]]:
    """Per model: C = the median per-example gradient norm of the first batch, and the norms."""
    workdir, path, _ = inputs
    cases = []
    for name in MODEL_NAMES:
        model, shape = _shape(name)
        run = h.base_run(h.REFERENCE, model, noise_multiplier=0.0)
        cases.append(h.case(f"{name}/norms", run, shape, norms=[f"{name}/x0", f"{name}/y0"]))
    out, errors = h.probe_once(h.REFERENCE, cases, path, workdir / "norms")
    assert not errors, errors
    result = {}
    for name in MODEL_NAMES:
        norms = out[f"{name}/norms/norms"][: h.REAL_ROWS]
        result[name] = (float(np.median(norms)), norms)
    return result


def _cases(label: str, clip: dict[str, tuple[float, np.ndarray]]) -> list[dict]:
    cases = []
    for name in MODEL_NAMES:
        model, shape = _shape(name)
        c = clip[name][0]
        dp0 = h.base_run(label, model, noise_multiplier=0.0, max_grad_norm=c)
        sgd = h.with_optimizer(dp0, name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
        adam = h.with_optimizer(dp0, name="adam", learning_rate=1e-3, eps=ADAM_EPS, weight_decay=1e-3)
        nonprivate = h.with_optimizer(
            h.base_run(label, model, enabled=False), name="sgd", learning_rate=0.1, momentum=0.9
        )
        noisy = h.with_optimizer(
            h.base_run(label, model, noise_multiplier=NOISE_SIGMA, max_grad_norm=NOISE_C),
            name="sgd",
            learning_rate=NOISE_LR,
        )
        cases += [
            h.case(f"{name}/logits", sgd, shape, logits=f"{name}/logits_x"),  # bench.probe: then sgd reuses it
            h.case(f"{name}/sgd", sgd, shape, steps=h.steps(name)),
            h.case(f"{name}/sgd_zero", sgd, shape, steps=h.steps(name, zero=True, n=1)),
            *(
                [h.case(f"{name}/sgd_chunked", sgd, shape, steps=h.steps(name), physical_batch_size=CHUNK)]
                if name in CHUNKED_MODELS
                else []
            ),
            h.case(f"{name}/adam", adam, shape, steps=h.steps(name)),
            h.case(f"{name}/nonprivate", nonprivate, shape, steps=h.steps(name)),
            h.case(f"{name}/noise", noisy, shape, steps=h.steps(name, mask="empty_mask", n=1)),
        ]
    return cases


def _units(label: str, cases: list[dict]) -> list[tuple[str, list[dict], bool]]:
    """A label's cases as (name, cases, heavy) units, each probed in a process of its own: the small models
    together, and the heavy models per model, or for TF Privacy per case (a model's logits case with the case
    after it, which builds the same backend and so takes the one the logits case built)."""
    small = [c for c in cases if c["run"]["model"] not in HEAVY_MODELS]
    units = [("small", small, False)] if small else []
    tf = label.startswith("tf_privacy:")
    for model in HEAVY_MODELS:
        mine = [c for c in cases if c["run"]["model"] == model]
        if not tf:
            units.append((model, mine, False))
            continue
        k = 0
        while k < len(mine):
            n = 2 if mine[k]["id"].endswith("/logits") and k + 1 < len(mine) else 1
            units.append((mine[k + n - 1]["id"].replace("/", "-"), mine[k : k + n], True))
            k += n
    return units


class Outputs:
    """label -> (arrays, errors) of every case of that backend/variant, each unit probed once per session (a
    second pytest process of the session, an xdist worker, reads what the first wrote)."""

    def __init__(self, workdir: Path, inputs: Path, clip: dict[str, tuple[float, np.ndarray]]):
        self.workdir, self.inputs, self.clip = workdir, inputs, clip
        self.cache: dict[str, tuple[dict[str, np.ndarray], dict]] = {}

    def _probe(self, label: str, unit: tuple[str, list[dict], bool]) -> tuple[dict[str, np.ndarray], dict]:
        name, cases, heavy = unit
        heavy_slots = (self.workdir / "heavy", HEAVY_SLOTS) if heavy else None
        workdir = self.workdir / label.replace(":", "_") / name
        return h.probe_once(label, cases, self.inputs, workdir, heavy_slots=heavy_slots)

    def _merge(self, label: str, results: list[tuple[dict[str, np.ndarray], dict]]) -> None:
        arrays, errors = {}, {}
        for a, e in results:
            arrays.update(a)
            errors.update(e)
        self.cache[label] = (arrays, errors)

    def prefetch(self, labels: list[str]) -> None:
        """Probe `labels` LANES at a time: the heavy units first (the longest), then those with the most cases."""
        units = [(label, unit) for label in labels for unit in _units(label, _cases(label, self.clip))]
        order = sorted(range(len(units)), key=lambda k: (not units[k][1][2], -len(units[k][1][1])))
        with ThreadPoolExecutor(max_workers=LANES) as pool:
            done = dict(zip(order, pool.map(lambda k: self._probe(*units[k]), order)))
        for label in labels:
            self._merge(label, [done[k] for k in range(len(units)) if units[k][0] == label])

    def __getitem__(self, label: str) -> tuple[dict[str, np.ndarray], dict]:
        if label not in self.cache:
            self._merge(label, [self._probe(label, unit) for unit in _units(label, _cases(label, self.clip))])
        return self.cache[label]


@pytest.fixture(scope="session")
def outputs(inputs, clip_norms) -> Outputs:
    """label -> (arrays, errors) for every installed backend/variant (see LANES)."""
    workdir, path, _ = inputs
    store = Outputs(workdir, path, clip_norms)
    store.prefetch(LABELS)
    return store


def _check_case(label: str, cid: str, errors: dict[str, str]) -> None:
    """A variant that declares a model unsupported (bench.backend.Unsupported) is skipped, not failed."""
    if cid not in errors:
        return
    if errors[cid].startswith("Unsupported:"):
        pytest.skip(f"{label}: {errors[cid]}")
    pytest.fail(f"{label} failed case {cid}: {errors[cid]}")


def _get(outputs, label: str, key: str) -> np.ndarray:
    arrays, errors = outputs[label]
    cid = key.split("/step")[0] if "/step" in key else key.rsplit("/", 1)[0]
    _check_case(label, cid, errors)
    return arrays[key]


def _params_at(outputs, label: str, cid: str, step: int) -> dict[str, np.ndarray]:
    arrays, errors = outputs[label]
    _check_case(label, cid, errors)
    prefix = f"{cid}/step{step}/"
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix) and not k.endswith("/stats")}


def _assert_params_close(actual: dict, expected: dict, what: str, tol=PARAMS_TOL) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: parameter names differ"
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], err_msg=f"{what}: {name}", **tol)


def test_clip_norm_splits_the_batch(clip_norms):
    """The DP-step tests clip some examples and leave others unclipped."""
    for name, (c, norms) in clip_norms.items():
        assert (norms > c * 1.01).any() and (norms < c * 0.99).any(), (name, c, norms)


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("label", OTHERS)
def test_logits_match_reference(outputs, label, model):
    expected = _get(outputs, h.REFERENCE, f"{model}/logits/logits")
    actual = _get(outputs, label, f"{model}/logits/logits")
    np.testing.assert_allclose(actual, expected, **LOGITS_TOL)


@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "nonprivate"])
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("label", OTHERS)
def test_steps_match_reference(outputs, label, model, optimizer, step):
    cid = f"{model}/{optimizer}"
    expected = _params_at(outputs, h.REFERENCE, cid, step)
    tol = MODEL_PARAMS_TOL.get((model, optimizer), PARAMS_TOL)
    actual = _params_at(outputs, label, cid, step)
    share = ILL_CONDITIONED.get((model, optimizer, step))
    if share is None:
        _assert_params_close(actual, expected, f"{label} {cid} step {step}", tol)
    else:
        a, e = (np.concatenate([p[k].ravel() for k in sorted(expected)]) for p in (actual, expected))
        off = np.abs(a - e) > tol["atol"] + tol["rtol"] * np.abs(e)
        assert off.mean() < share, f"{label} {cid} step {step}: {off.mean():.2%} of coordinates differ"
        assert np.abs(a - e).max() <= 2 * step * 1e-3, "a coordinate moved further than Adam can move it"
    stats = _get(outputs, label, f"{cid}/step{step}/stats")
    ref_stats = _get(outputs, h.REFERENCE, f"{cid}/step{step}/stats")
    np.testing.assert_allclose(stats, ref_stats, rtol=1e-4 if share is None else 1e-3, atol=1e-6)
    assert stats[2] == h.REAL_ROWS


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("label", LABELS)
def test_padded_rows_change_nothing(outputs, label, model):
    garbage = _params_at(outputs, label, f"{model}/sgd", 1)
    zeros = _params_at(outputs, label, f"{model}/sgd_zero", 1)
    _assert_params_close(garbage, zeros, f"{label} {model}: garbage vs zero padding", dict(rtol=1e-6, atol=1e-7))


@pytest.mark.parametrize("model", CHUNKED_MODELS)
@pytest.mark.parametrize("label", LABELS)
def test_chunked_batch_matches_one_chunk(outputs, label, model):
    """A batch of two physical chunks gives the reference's one-chunk update: chunk sums add up exactly."""
    expected = _params_at(outputs, h.REFERENCE, f"{model}/sgd", 3)
    actual = _params_at(outputs, label, f"{model}/sgd_chunked", 3)
    _assert_params_close(actual, expected, f"{label} {model}: {h.PHYSICAL} rows in chunks of {CHUNK}")
    assert _get(outputs, label, f"{model}/sgd_chunked/step3/stats")[2] == h.REAL_ROWS


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("label", LABELS)
def test_empty_batch_update_is_pure_noise(outputs, label, model):
    """With no example in the batch, the update is lr * N(0, sigma^2 C^2) / (q N) per coordinate.

    The sample standard deviation of n iid normals has relative standard error
    1/sqrt(2(n-1)); we allow 5 of them (a false alarm about once in 3.5 million runs).
    """
    name, shape = _shape(model)
    init = init_params(build_spec(name, shape, h.NUM_CLASSES), 0)
    after = _params_at(outputs, label, f"{model}/noise", 1)
    update = np.concatenate([(after[k] - init[k]).ravel() for k in sorted(init)]).astype(np.float64)
    n = update.size
    assert n == num_params(build_spec(name, shape, h.NUM_CLASSES))
    expected_std = NOISE_LR * NOISE_SIGMA * NOISE_C / h.EXPECTED_BATCH
    rel_se = 1 / math.sqrt(2 * (n - 1))
    assert abs(update.std() / expected_std - 1) < 5 * rel_se, (update.std(), expected_std)
    assert abs(update.mean()) < 5 * expected_std / math.sqrt(n)
    stats = _get(outputs, label, f"{model}/noise/step1/stats")
    assert stats[2] == 0
