"""YAML suites -> validated, frozen RunSpecs (grid expansion, target-epsilon calibration).

A suite is a list of workloads; each workload's `privacy` list is a grid axis, crossed
with the suite's backends and seeds. Every error names the file, the field path, the
value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.accounting import CalibrationError, calibrate_noise
from bench.audit.canaries import training_size
from bench.backend import UnknownBackendError, parse_backend
from bench.models import MODELS, build_spec
from bench.spec import (
    MAX_INT,
    AdaptiveClipping,
    AuditConfig,
    DatasetSpec,
    DPConfig,
    FederatedConfig,
    OptimizerSpec,
    PartitionSpec,
    PerfFlags,
    RunSpec,
    SpecError,
    TrainConfig,
    short_repr,
)

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"

# (train, test, input shape, classes) of the on-disk datasets; synthetic is configured.
DATASET_INFO: dict[str, tuple[int, int, tuple[int, int, int], int]] = {
    "fashion-mnist": (60_000, 10_000, (28, 28, 1), 10),
    "mnist": (60_000, 10_000, (28, 28, 1), 10),
    "cifar10": (50_000, 10_000, (32, 32, 3), 10),
    "digits": (1_500, 297, (8, 8, 1), 10),
}
SYNTHETIC_DEFAULTS = (10_000, 2_000, (28, 28, 1), 10)

SUITE_KEYS = {"name", "description", "backends", "seeds", "threads", "timeout", "memory_limit_gb", "workloads"}
WORKLOAD_KEYS = {"name", "dataset", "model", "train", "dp", "privacy", "perf", "federated", "audit"}
AUDIT_KEYS = {f.name for f in dataclasses.fields(AuditConfig)}
DATASET_KEYS = {f.name for f in dataclasses.fields(DatasetSpec)}
TRAIN_KEYS = {"epochs", "batch_size", "optimizer", "eval_batch_size"}
OPTIMIZER_KEYS = {f.name for f in dataclasses.fields(OptimizerSpec)}
DP_KEYS = {"max_grad_norm", "delta", "sampling"}
PRIVACY_KEYS = {"dp", "noise_multiplier", "target_epsilon", "learning_rate"}
# A federated privacy setting may also set the clients per round, or have them calibrated with the noise from a
# target epsilon and the noise per client the model tolerates (as the TFF tutorial's search does).
FEDERATED_PRIVACY_KEYS = PRIVACY_KEYS | {"clients_per_round", "noise_per_client", "accountant"}
FEDERATED_KEYS = {f.name for f in dataclasses.fields(FederatedConfig)} - {"total_clients"}
PARTITION_KEYS = {f.name for f in dataclasses.fields(PartitionSpec)}
CLIPPING_KEYS = {f.name for f in dataclasses.fields(AdaptiveClipping)}
ACCOUNTANTS = ("pld", "rdp")
PERF_KEYS = {"physical_batch_size", "gpus"}
DEFAULT_TIMEOUT_S = 3600.0
# A grid larger than this is a mistake (or a YAML alias bomb), not a sweep: refused before it is expanded.
MAX_RUNS = 100_000


class SuiteError(ValueError):
    """A bad suite: `file: path: got value, expected ...`."""

    def __init__(self, file: str | Path, path: str, value: Any, expected: str):
        self.file, self.path, self.value, self.expected = str(file), path, value, expected
        super().__init__(f"{file}: {path}: got {short_repr(value)}, expected {expected}")


@dataclass(frozen=True, kw_only=True)
class Suite:
    name: str
    path: Path
    description: str
    runs: tuple[RunSpec, ...]
    timeout: float
    memory_limit_gb: float | None = None


def suite_path(name_or_path: str) -> Path:
    """A path, or the name of a shipped suite (`quickstart` -> suites/quickstart.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return SUITES_DIR / f"{name_or_path}.yaml"


def list_suites() -> list[Path]:
    return sorted(SUITES_DIR.glob("*.yaml"))


class _Reader:
    """Walks the parsed YAML, checking keys and types and keeping the field path."""

    def __init__(self, file: Path):
        self.file = file

    def error(self, path: str, value: Any, expected: str) -> SuiteError:
        return SuiteError(self.file, path, value, expected)

    def mapping(self, value: Any, path: str, allowed: set[str], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.error(path or "(top level)", value, "a mapping")
        for key in value:
            if key not in allowed:
                name = str(key) if isinstance(key, str) and len(key) <= 60 else short_repr(key)
                raise self.error(
                    f"{path}.{name}" if path else name, key, f"one of the keys {', '.join(sorted(allowed))}"
                )
        for key in required:
            if key not in value:
                raise self.error(f"{path}.{key}" if path else key, None, "a value (this field is required)")
        return value

    def seq(self, value: Any, path: str) -> list:
        if not isinstance(value, list) or not value:
            raise self.error(path, value, "a non-empty list")
        return value

    def build(self, cls: type, path: str, **kwargs: Any) -> Any:
        try:
            return cls(**kwargs)
        except SpecError as e:
            field = e.path.split(".")[-1]
            raise self.error(f"{path}.{field}" if path else field, e.value, e.expected) from None
        except TypeError as e:
            raise self.error(path, kwargs, f"valid fields ({e})") from None


def _accounting_failed(e: Exception, where: str) -> CalibrationError:
    """The accountant itself gave up (dp-accounting raises what numpy and scipy raise: MemoryError for a PLD grid
    of absurd size, OverflowError, ...): a suite error, not a traceback."""
    return CalibrationError(f"the accountant failed {where} ({type(e).__name__}: {e})")


@lru_cache(maxsize=256)
def _calibrated(target: float, q: float, steps: int, delta: float, accountant: str = "pld") -> float:
    try:
        return calibrate_noise(target_epsilon=target, sample_rate=q, steps=steps, delta=delta, accountant=accountant)
    except CalibrationError:
        raise
    except Exception as e:
        raise _accounting_failed(e, f"at sample rate {q:g} over {steps} steps") from None


@lru_cache(maxsize=64)
def _calibrated_clients(target: float, delta: float, rounds: int, clients: int, ratio: float, accountant: str):
    from bench.accounting import calibrate_clients

    try:
        return calibrate_clients(
            target_epsilon=target,
            delta=delta,
            rounds=rounds,
            total_clients=clients,
            noise_per_client=ratio,
            accountant=accountant,
        )
    except CalibrationError:
        raise
    except Exception as e:
        raise _accounting_failed(e, f"for {clients} clients over {rounds} rounds") from None


def _dataset_size(r: _Reader, ds: DatasetSpec, path: str) -> tuple[int, tuple[int, int, int], int]:
    if ds.name == "synthetic":
        n, _, shape, classes = SYNTHETIC_DEFAULTS
        return ds.train_size or n, ds.shape or shape, ds.num_classes or classes
    if ds.name not in DATASET_INFO:
        raise r.error(f"{path}.name", ds.name, f"one of {', '.join([*DATASET_INFO, 'synthetic'])}")
    if ds.shape is not None or ds.num_classes is not None:
        raise r.error(f"{path}.shape", ds.shape, "shape/num_classes only for the synthetic dataset")
    n_train, n_test, shape, classes = DATASET_INFO[ds.name]
    if ds.train_size is not None and ds.train_size > n_train:
        raise r.error(f"{path}.train_size", ds.train_size, f"at most {n_train} ({ds.name} has {n_train})")
    if ds.test_size is not None and ds.test_size > n_test:
        raise r.error(f"{path}.test_size", ds.test_size, f"at most {n_test} ({ds.name} has {n_test})")
    return ds.train_size or n_train, shape, classes


def _positive_number(value: Any) -> bool:
    """A finite number > 0 (not a bool, not an integer too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        return False


def _backends(r: _Reader, labels: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(labels, str):
        labels = [s for s in labels.split(",") if s.strip()]
    out = []
    for i, label in enumerate(r.seq(labels, path)):
        if not isinstance(label, str):
            raise r.error(f"{path}[{i}]", label, "a backend name such as 'jax' or 'opacus:ghost'")
        try:
            out.append(parse_backend(label))
        except UnknownBackendError as e:
            raise r.error(f"{path}[{i}]", label, str(e)) from None
    return out


def _seeds(r: _Reader, seeds: Any, path: str) -> list[int]:
    if len(r.seq(seeds, path)) > MAX_RUNS:
        raise r.error(path, f"{len(seeds)} seeds", f"at most {MAX_RUNS}")
    for i, s in enumerate(seeds):
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_INT:
            raise r.error(f"{path}[{i}]", s, "an integer >= 0 (below 2**63)")
    return list(seeds)


def _federated(r: _Reader, raw: Any, path: str, n: int) -> FederatedConfig:
    """The workload's `federated:` block, with the number of clients taken from its partition."""
    raw = dict(r.mapping(raw, path, FEDERATED_KEYS, ("partition", "rounds", "clients_per_round")))
    part_raw = r.mapping(raw.pop("partition"), f"{path}.partition", PARTITION_KEYS, ("kind",))
    partition = r.build(PartitionSpec, f"{path}.partition", **part_raw)
    if partition.kind == "dirichlet":
        total = partition.clients
        if total > n:
            raise r.error(f"{path}.partition.clients", total, f"at most the {n} training examples")
    else:
        from bench.federated.partition import load_client_ids

        try:
            total = len(np.unique(load_client_ids(partition.file, n)))
        except ValueError as e:
            raise r.error(f"{path}.partition.file", partition.file, str(e)) from None
    server_raw = r.mapping(raw.pop("server_optimizer", {}), f"{path}.server_optimizer", OPTIMIZER_KEYS)
    if server_raw:
        raw["server_optimizer"] = r.build(OptimizerSpec, f"{path}.server_optimizer", **server_raw)
    if "adaptive_clipping" in raw:
        clipping = raw.pop("adaptive_clipping")
        if clipping is False or clipping is None:
            raw["adaptive_clipping"] = None
        elif clipping is not True:
            clip_raw = r.mapping(clipping, f"{path}.adaptive_clipping", CLIPPING_KEYS)
            raw["adaptive_clipping"] = r.build(AdaptiveClipping, f"{path}.adaptive_clipping", **clip_raw)
    return r.build(FederatedConfig, path, partition=partition, total_clients=total, **raw)


def _federated_setting(
    r: _Reader, setting: dict, path: str, fed: FederatedConfig, dp: DPConfig
) -> tuple[FederatedConfig, DPConfig]:
    """A privacy setting of a federated workload: its clients per round and noise multiplier, calibrated from
    a target epsilon (user-level: Poisson sampling of clients, one step per round) where asked."""
    if "clients_per_round" in setting:
        fed = r.build(FederatedConfig, path, **{**_fields(fed), "clients_per_round": setting["clients_per_round"]})
    accountant = setting.get("accountant", "pld")
    if accountant not in ACCOUNTANTS:
        raise r.error(f"{path}.accountant", accountant, f"one of {', '.join(ACCOUNTANTS)}")
    if "noise_per_client" in setting:
        ratio = setting["noise_per_client"]
        if "target_epsilon" not in setting or "clients_per_round" in setting:
            raise r.error(path, setting, "noise_per_client with target_epsilon and without clients_per_round")
        if not _positive_number(ratio):
            raise r.error(f"{path}.noise_per_client", ratio, "a positive number")
        try:
            found = _calibrated_clients(dp.target_epsilon, dp.delta, fed.rounds, fed.total_clients, ratio, accountant)
        except CalibrationError as e:
            raise r.error(f"{path}.target_epsilon", dp.target_epsilon, f"a reachable epsilon: {e}") from None
        fed = dataclasses.replace(fed, clients_per_round=found.clients_per_round)
        return fed, dataclasses.replace(dp, noise_multiplier=round(found.noise_multiplier, 6))
    if dp.enabled and dp.target_epsilon is not None:
        try:
            sigma = _calibrated(dp.target_epsilon, fed.sample_rate, fed.rounds, dp.delta, accountant)
        except CalibrationError as e:
            raise r.error(f"{path}.target_epsilon", dp.target_epsilon, f"a reachable epsilon: {e}") from None
        dp = dataclasses.replace(dp, noise_multiplier=round(sigma, 6))
    if "accountant" in setting and (not dp.enabled or dp.target_epsilon is None):
        raise r.error(f"{path}.accountant", accountant, "nothing without a target_epsilon to calibrate")
    _check_noise_split(r, path, fed, dp)
    return fed, dp


def _check_noise_split(r: _Reader, path: str, fed: FederatedConfig, dp: DPConfig) -> None:
    """Adaptive clipping spends part of the noise on the count of unclipped clients (Andrew et al. 2021), which
    needs z < 2 * count_stddev: say so when the suite loads, not in the first round."""
    from bench.federated.aggregation import noise_params

    if not dp.enabled:
        return
    try:
        noise_params(dp.noise_multiplier, expected_clients=fed.clients_per_round, adaptive=fed.adaptive_clipping)
    except ValueError as e:
        raise r.error(f"{path}.noise_multiplier", dp.noise_multiplier, f"a noise the clipping can split: {e}") from None


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _workload_runs(
    r: _Reader, w: Any, path: str, suite: str, backends: list[tuple[str, str]], seeds: list[int], threads: int
) -> list[RunSpec]:
    w = r.mapping(w, path, WORKLOAD_KEYS, ("name", "dataset", "model", "train", "privacy"))
    if not isinstance(w["name"], str) or not w["name"]:
        raise r.error(f"{path}.name", w["name"], "a non-empty string")
    ds_raw = w["dataset"] if isinstance(w["dataset"], dict) else {"name": w["dataset"]}
    ds_raw = dict(r.mapping(ds_raw, f"{path}.dataset", DATASET_KEYS, ("name",)))
    if isinstance(ds_raw.get("shape"), list):
        ds_raw["shape"] = tuple(ds_raw["shape"])
    ds = r.build(DatasetSpec, f"{path}.dataset", **ds_raw)
    n, shape, classes = _dataset_size(r, ds, f"{path}.dataset")

    model = w["model"]
    if model not in MODELS:
        raise r.error(f"{path}.model", model, f"one of {', '.join(MODELS)}")
    try:
        build_spec(model, shape, classes)
    except ValueError as e:
        raise r.error(f"{path}.model", model, f"a model that fits the data ({e})") from None

    train_raw = dict(r.mapping(w["train"], f"{path}.train", TRAIN_KEYS, ("epochs", "batch_size")))
    opt_raw = r.mapping(train_raw.pop("optimizer", {}), f"{path}.train.optimizer", OPTIMIZER_KEYS)
    opt = r.build(OptimizerSpec, f"{path}.train.optimizer", **opt_raw)
    train = r.build(TrainConfig, f"{path}.train", optimizer=opt, **train_raw)
    if train.batch_size > n:
        raise r.error(f"{path}.train.batch_size", train.batch_size, f"at most the {n} training examples")

    dp_base = r.mapping(w.get("dp", {}), f"{path}.dp", DP_KEYS)
    r.build(DPConfig, f"{path}.dp", enabled=False, **dp_base)
    fed = _federated(r, w["federated"], f"{path}.federated", n) if w.get("federated") is not None else None
    if fed is not None and ds.augment:
        raise r.error(f"{path}.dataset.augment", ds.augment, "false for a federated workload")
    if fed is not None and dp_base.get("sampling", "poisson") != "poisson":
        raise r.error(f"{path}.dp.sampling", dp_base["sampling"], "poisson (client sampling) for a federated workload")
    perf_raw = r.mapping(w.get("perf", {}), f"{path}.perf", PERF_KEYS)
    perf = r.build(PerfFlags, f"{path}.perf", threads=threads, **perf_raw)

    audit = None
    if w.get("audit") is not None:
        audit = r.build(AuditConfig, f"{path}.audit", **r.mapping(w["audit"], f"{path}.audit", AUDIT_KEYS))
        if fed is not None:
            raise r.error(
                f"{path}.audit", w["audit"], "no audit block in a federated workload (one-run audits train DP-SGD)"
            )
        if audit.kind == "mislabeled" and audit.canaries >= n:
            raise r.error(f"{path}.audit.canaries", audit.canaries, f"fewer mislabeled canaries than the {n} examples")
    grid = len(r.seq(w["privacy"], f"{path}.privacy")) * len(backends) * len(seeds)
    if grid > MAX_RUNS:
        raise r.error(f"{path}.privacy", f"{grid} runs", f"at most {MAX_RUNS} runs (privacy x backends x seeds)")

    def settings_for(size: int) -> list[tuple[RunSpec, DPConfig]]:
        """Every privacy setting (calibrated) for a training set of `size` examples."""
        settings: list[tuple[RunSpec, DPConfig]] = []
        for i, setting in enumerate(r.seq(w["privacy"], f"{path}.privacy")):
            p = f"{path}.privacy[{i}]"
            setting = r.mapping(setting, p, FEDERATED_PRIVACY_KEYS if fed is not None else PRIVACY_KEYS)
            enabled = setting.get("dp", True)
            if not isinstance(enabled, bool):
                raise r.error(f"{p}.dp", enabled, "true or false")
            if enabled and ("noise_multiplier" in setting) == ("target_epsilon" in setting):
                raise r.error(p, setting, "exactly one of noise_multiplier and target_epsilon")
            if not enabled and set(setting) - {"dp", "learning_rate", "clients_per_round"}:
                raise r.error(p, setting, "only 'learning_rate' (or 'clients_per_round') beside 'dp: false'")
            run_train = train
            if "learning_rate" in setting:
                opt_p = r.build(OptimizerSpec, p, **{**opt_raw, "learning_rate": setting["learning_rate"]})
                run_train = dataclasses.replace(train, optimizer=opt_p)
            dp = r.build(
                DPConfig,
                p,
                enabled=enabled,
                noise_multiplier=setting.get("noise_multiplier"),
                target_epsilon=setting.get("target_epsilon"),
                **dp_base,
            )
            run_fed = None
            if fed is not None:
                run_fed, dp = _federated_setting(r, setting, p, fed, dp)
            probe = RunSpec(
                suite=suite,
                workload=w["name"],
                dataset=ds,
                model=model,
                train=run_train,
                dp=dp,
                backend="",
                dataset_size=size,
                federated=run_fed,
                audit=audit,
            )
            if run_fed is None and dp.enabled and dp.target_epsilon is not None:
                if dp.sampling != "poisson":
                    raise r.error(f"{p}.target_epsilon", dp.target_epsilon, "noise_multiplier with shuffle sampling")
                try:
                    sigma = _calibrated(dp.target_epsilon, probe.sample_rate, probe.total_steps, dp.delta)
                except CalibrationError as e:
                    raise r.error(f"{p}.target_epsilon", dp.target_epsilon, f"a reachable epsilon: {e}") from None
                dp = dataclasses.replace(dp, noise_multiplier=round(sigma, 6))
            settings.append((probe, dp))
        return settings

    # A backend's runs of every privacy setting are adjacent, so that a slow spell of a shared machine falls on
    # both sides of its DP / non-private ratio rather than on one.
    # An audited workload's training set holds the canaries each seed includes: its size, so its sample rate and
    # calibrated noise, are the seed's.
    by_seed = {seed: settings_for(training_size(n, audit, seed) if audit else n) for seed in dict.fromkeys(seeds)}
    return [
        dataclasses.replace(probe, dp=dp, backend=backend, variant=variant, seed=seed, perf=perf)
        for backend, variant in backends
        for seed in seeds
        for probe, dp in by_seed[seed]
    ]


def load_suite(
    name_or_path: str | Path, *, backends: str | list[str] | None = None, seeds: list[int] | None = None
) -> Suite:
    """Parse and validate a suite; `backends`/`seeds` override the file's."""
    path = suite_path(str(name_or_path))
    r = _Reader(path)
    if not path.exists():
        raise SuiteError(path, "(file)", str(path), "an existing suite file (see `bench suites`)")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as e:
        raise SuiteError(path, "(file)", str(e), "a readable UTF-8 text file") from None
    try:
        raw = yaml.safe_load(text)  # safe: plain data only, no tag constructs a Python object
    except yaml.YAMLError as e:
        raise SuiteError(path, "(yaml)", str(e).splitlines()[0], "valid YAML") from None
    except Exception as e:  # PyYAML's constructors raise what they meet: month 13, `!!int ""`, deep nesting
        raise SuiteError(path, "(yaml)", f"{type(e).__name__}: {e}", "valid YAML") from None
    raw = r.mapping(raw, "", SUITE_KEYS, ("workloads",))
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise r.error("name", name, "a non-empty string")
    threads = raw.get("threads", 2)
    r.build(PerfFlags, "", threads=threads)
    timeout = raw.get("timeout", DEFAULT_TIMEOUT_S)
    if not _positive_number(timeout):
        raise r.error("timeout", timeout, "a positive number of seconds")
    memory_limit = raw.get("memory_limit_gb")
    if memory_limit is not None and not _positive_number(memory_limit):
        raise r.error("memory_limit_gb", memory_limit, "a number > 0")
    backend_list = _backends(r, backends if backends is not None else raw.get("backends", ["jax"]), "backends")
    seed_list = _seeds(r, seeds if seeds is not None else raw.get("seeds", [0]), "seeds")
    runs: list[RunSpec] = []
    names = set()
    for i, w in enumerate(r.seq(raw["workloads"], "workloads")):
        wruns = _workload_runs(r, w, f"workloads[{i}]", name, backend_list, seed_list, threads)
        if wruns[0].workload in names:
            raise r.error(f"workloads[{i}].name", wruns[0].workload, "a name not used by another workload")
        names.add(wruns[0].workload)
        runs += wruns
        if len(runs) > MAX_RUNS:
            raise r.error("workloads", f"{len(runs)} runs", f"at most {MAX_RUNS} runs in a suite")
    return Suite(
        name=name,
        path=path,
        description=str(raw.get("description", "")),
        runs=tuple(runs),
        timeout=float(timeout),
        memory_limit_gb=float(memory_limit) if memory_limit is not None else None,
    )
