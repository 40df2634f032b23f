"""Frozen, validated run specifications.

Privacy settings (`DPConfig`) are kept apart from training settings (`TrainConfig`) and
from performance settings (`PerfFlags`), as in jax-privacy's execution plans. Every
dataclass validates itself on construction and raises `SpecError` naming the field.
`RunSpec.run_id` is a hash of everything that determines the run's numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, Literal

Sampling = Literal["poisson", "shuffle"]
OptimizerName = Literal["sgd", "adam"]

SAMPLINGS: tuple[str, ...] = ("poisson", "shuffle")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


# Counts are written to int64 result columns (and seeds feed numpy's generators): larger ones are not valid.
MAX_INT = 2**63 - 1

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 120, 60, 120


def short_repr(value: Any) -> str:
    """repr() cut to a readable length, whatever the value: huge strings and numbers, deep or aliased YAML trees."""
    return _REPR.repr(value)


class SpecError(ValueError):
    """An invalid specification value: `path` names the field, `expected` what was wanted."""

    def __init__(self, path: str, value: Any, expected: str):
        self.path = path
        self.value = value
        self.expected = expected
        super().__init__(f"{path}: got {short_repr(value)}, expected {expected}")


def _check(ok: bool, path: str, value: Any, expected: str) -> None:
    if not ok:
        raise SpecError(path, value, expected)


def _int(value: Any) -> bool:
    """An integer (not a bool) that fits the int64 result columns."""
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT


def _positive_int(path: str, value: Any) -> None:
    too_large = isinstance(value, int) and value > MAX_INT
    _check(_int(value) and value > 0, path, value, "a positive integer" + (" below 2**63" if too_large else ""))


def _number(value: Any) -> bool:
    """A finite int or float, not a bool; integers too large for a float are not numbers here."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _as_floats(obj: Any, *names: str) -> None:
    """Store validated numbers as floats, so `1` and `1.0` give the same run_id."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            object.__setattr__(obj, name, float(value))


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Which data, how much of it, and whether the core augments it.

    `train_size`/`test_size` take a seeded subset (None: all). `shape` and
    `num_classes` apply to the `synthetic` dataset only (shape is H, W, C).
    """

    name: str
    train_size: int | None = None
    test_size: int | None = None
    augment: bool = False
    shape: tuple[int, int, int] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), "dataset.name", self.name, "a dataset name")
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            if value is not None:
                _positive_int(f"dataset.{key}", value)
        _check(isinstance(self.augment, bool), "dataset.augment", self.augment, "true or false")
        if self.shape is not None:
            ok = isinstance(self.shape, tuple) and len(self.shape) == 3 and all(_int(s) and s > 0 for s in self.shape)
            _check(ok, "dataset.shape", self.shape, "[height, width, channels] of positive integers")
        if self.num_classes is not None:
            _check(
                _int(self.num_classes) and self.num_classes >= 2,
                "dataset.num_classes",
                self.num_classes,
                "an integer >= 2",
            )


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """The optimizer applied to the (noisy) mean gradient; weight decay is coupled L2, as torch."""

    name: OptimizerName = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, "optimizer.name", self.name, f"one of {', '.join(OPTIMIZERS)}")
        _check(
            _number(self.learning_rate) and self.learning_rate > 0,
            "optimizer.learning_rate",
            self.learning_rate,
            "a positive number",
        )
        _check(
            _number(self.momentum) and 0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "0 <= momentum < 1"
        )
        _check(
            _number(self.weight_decay) and self.weight_decay >= 0,
            "optimizer.weight_decay",
            self.weight_decay,
            "a number >= 0",
        )
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _check(_number(value) and 0 <= value < 1, f"optimizer.{key}", value, "0 <= beta < 1")
        _check(_number(self.eps) and self.eps > 0, "optimizer.eps", self.eps, "a positive number")
        if self.name == "adam":
            _check(self.momentum == 0, "optimizer.momentum", self.momentum, "0 for adam (use beta1)")
        _as_floats(self, "learning_rate", "momentum", "weight_decay", "beta1", "beta2", "eps")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Epochs, expected (logical) batch size and the optimizer, identical for every backend."""

    epochs: int
    batch_size: int
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        _positive_int("train.epochs", self.epochs)
        _positive_int("train.batch_size", self.batch_size)
        _positive_int("train.eval_batch_size", self.eval_batch_size)


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """DP-SGD privacy settings (Abadi et al. 2016, "Deep Learning with Differential Privacy").

    `enabled=False` is the non-private baseline on the same batches. When enabled,
    a suite gives `noise_multiplier` or `target_epsilon`; the suite loader calibrates
    the second into the first before a run starts and keeps both.
    """

    enabled: bool = True
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    sampling: Sampling = "poisson"

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "dp", self.enabled, "true or false")
        _check(self.sampling in SAMPLINGS, "sampling", self.sampling, f"one of {', '.join(SAMPLINGS)}")
        _check(
            _number(self.max_grad_norm) and self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "a positive number",
        )
        _check(_number(self.delta) and 0 < self.delta < 1, "delta", self.delta, "0 < delta < 1")
        _as_floats(self, "max_grad_norm", "delta")
        if not self.enabled:
            _check(self.noise_multiplier is None, "noise_multiplier", self.noise_multiplier, "nothing when dp is false")
            _check(self.target_epsilon is None, "target_epsilon", self.target_epsilon, "nothing when dp is false")
            return
        _check(
            self.noise_multiplier is not None or self.target_epsilon is not None,
            "noise_multiplier",
            self.noise_multiplier,
            "a noise_multiplier or a target_epsilon when dp is true",
        )
        if self.noise_multiplier is not None:
            _check(
                _number(self.noise_multiplier) and self.noise_multiplier >= 0,
                "noise_multiplier",
                self.noise_multiplier,
                "a number >= 0",
            )
        if self.target_epsilon is not None:
            _check(
                _number(self.target_epsilon) and self.target_epsilon > 0,
                "target_epsilon",
                self.target_epsilon,
                "a positive number",
            )
        _as_floats(self, "noise_multiplier", "target_epsilon")


@dataclass(frozen=True, kw_only=True)
class PerfFlags:
    """How a run is executed; none of this changes what is computed.

    `physical_batch_size` is the fixed shape Poisson batches are padded to (None: the
    core picks one a few standard deviations above the expected batch size). `gpus` is what
    a run reserves under the Ray executor, beside `threads` CPUs; the backend still picks the
    device it sees, so the local executor ignores it.
    """

    threads: int = 2
    physical_batch_size: int | None = None
    gpus: int = 0

    def __post_init__(self) -> None:
        _positive_int("threads", self.threads)
        _check(_int(self.gpus) and 0 <= self.gpus <= 64, "gpus", self.gpus, "an integer from 0 to 64")
        if self.physical_batch_size is not None:
            _positive_int("physical_batch_size", self.physical_batch_size)


PartitionKind = Literal["dirichlet", "client_ids"]
PARTITIONS: tuple[str, ...] = ("dirichlet", "client_ids")


@dataclass(frozen=True, kw_only=True)
class PartitionSpec:
    """How the core splits the training set into clients, identically for every backend.

    `dirichlet`: `clients` clients of (nearly) equal size, each with its own label mix drawn from
    Dirichlet(`alpha`) (Hsu et al. 2019; small alpha: few labels per client). `client_ids`: `file` is a
    .npy array with one integer client id per training example (as EMNIST's writers).
    """

    kind: PartitionKind = "dirichlet"
    clients: int | None = None
    alpha: float = 0.5
    file: str | None = None

    def __post_init__(self) -> None:
        _check(self.kind in PARTITIONS, "partition.kind", self.kind, f"one of {', '.join(PARTITIONS)}")
        if self.kind == "dirichlet":
            _positive_int("partition.clients", self.clients)
            _check(_number(self.alpha) and self.alpha > 0, "partition.alpha", self.alpha, "a positive number")
            _check(self.file is None, "partition.file", self.file, "no file for a dirichlet partition")
            _as_floats(self, "alpha")
        else:
            _check(isinstance(self.file, str) and bool(self.file), "partition.file", self.file, "a .npy file path")


@dataclass(frozen=True, kw_only=True)
class AdaptiveClipping:
    """Clip norm adapted each round towards a quantile of the clients' update norms
    (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"; TFF's defaults).

    The clip starts at the run's `max_grad_norm` and moves geometrically with `learning_rate`.
    `count_stddev` is the noise on the count of unclipped clients (None: clients_per_round / 20); its
    privacy cost is part of the run's noise multiplier.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        q = self.target_quantile
        _check(_number(q) and 0 < q < 1, "adaptive_clipping.target_quantile", q, "a number in (0, 1)")
        lr = self.learning_rate
        _check(_number(lr) and lr >= 0, "adaptive_clipping.learning_rate", lr, "a number >= 0")
        if self.count_stddev is not None:
            sd = self.count_stddev
            _check(_number(sd) and sd > 0, "adaptive_clipping.count_stddev", sd, "a positive number")
        _as_floats(self, "target_quantile", "learning_rate", "count_stddev")


@dataclass(frozen=True, kw_only=True)
class FederatedConfig:
    """Federated averaging with user-level DP (DP-FedAvg; McMahan et al. 2018).

    Each round, every client joins independently with probability clients_per_round / total_clients
    (Poisson sampling), trains locally as the run's `train` block says (epochs, batch size, client
    optimizer), and the core aggregates the clipped, noised model deltas and applies `server_optimizer`.
    `total_clients` is filled by the suite loader from the partition.
    """

    partition: PartitionSpec
    rounds: int
    clients_per_round: int
    server_optimizer: OptimizerSpec = field(
        default_factory=lambda: OptimizerSpec(name="sgd", learning_rate=1.0, momentum=0.9)
    )
    eval_every: int = 10
    adaptive_clipping: AdaptiveClipping | None = field(default_factory=AdaptiveClipping)
    total_clients: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.partition, PartitionSpec), "partition", self.partition, "a partition")
        _positive_int("rounds", self.rounds)
        _positive_int("clients_per_round", self.clients_per_round)
        _positive_int("eval_every", self.eval_every)
        if self.total_clients:
            _positive_int("total_clients", self.total_clients)
            _check(
                self.clients_per_round <= self.total_clients,
                "clients_per_round",
                self.clients_per_round,
                f"at most the number of clients ({self.total_clients})",
            )

    @property
    def sample_rate(self) -> float:
        return self.clients_per_round / self.total_clients


CanaryKind = Literal["mislabeled", "noise"]
CANARY_KINDS: tuple[str, ...] = ("mislabeled", "noise")


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """A one-run privacy audit of the run (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
    Training Run"): `canaries` extra examples, each in the training set with probability 1/2 (from the run's seed).

    After training the core guesses "in" for the `guesses // 2` canaries the final model fits best and "out" for
    the `guesses - guesses // 2` it fits worst, and turns the correct guesses into an epsilon lower bound.
    `kind`: `noise` (random inputs with random labels; the default) or `mislabeled` (training images with a
    wrong label, taken out of the training set).
    """

    canaries: int = 1000
    guesses: int = 100
    kind: CanaryKind = "noise"  # measured the stronger of the two on the MLP: see docs/audit.md

    def __post_init__(self) -> None:
        _check(_int(self.canaries) and self.canaries >= 2, "audit.canaries", self.canaries, "an integer >= 2")
        _check(
            _int(self.guesses) and 1 <= self.guesses <= self.canaries,
            "audit.guesses",
            self.guesses,
            f"an integer from 1 to the number of canaries ({self.canaries})",
        )
        _check(self.kind in CANARY_KINDS, "audit.kind", self.kind, f"one of {', '.join(CANARY_KINDS)}")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One run: a workload on one backend/variant with one privacy setting and seed."""

    suite: str
    workload: str
    dataset: DatasetSpec
    model: str
    train: TrainConfig
    dp: DPConfig
    backend: str
    variant: str = ""
    seed: int = 0
    perf: PerfFlags = field(default_factory=PerfFlags)
    dataset_size: int = 0  # training examples N after subsetting, filled by the suite loader
    federated: FederatedConfig | None = None  # a federated run: `train` is then each client's local training
    audit: AuditConfig | None = None  # a one-run privacy audit: canaries join the training set

    def __post_init__(self) -> None:
        _check(_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0 (below 2**63)")
        if self.federated is not None:
            _check(
                self.dp.sampling == "poisson",
                "dp.sampling",
                self.dp.sampling,
                "poisson for a federated run (its user-level epsilon is accounted for Poisson sampling of clients)",
            )
        if self.dataset_size:
            _check(
                self.train.batch_size <= self.dataset_size,
                "train.batch_size",
                self.train.batch_size,
                f"at most the number of training examples ({self.dataset_size})",
            )

    @property
    def sample_rate(self) -> float:
        """Examples per batch over N; for a federated run, clients per round over all clients."""
        if self.federated is not None:
            return self.federated.sample_rate
        return self.train.batch_size / self.dataset_size

    @property
    def steps_per_epoch(self) -> int:
        """round(1/q) for Poisson, ceil(N/B) batches of a permutation for shuffle; 1 round for federated."""
        if self.federated is not None:
            return 1
        if self.dp.sampling == "shuffle":
            return math.ceil(self.dataset_size / self.train.batch_size)
        return max(1, round(1 / self.sample_rate))

    @property
    def total_steps(self) -> int:
        """Noisy aggregations: DP-SGD steps, or federated rounds."""
        if self.federated is not None:
            return self.federated.rounds
        return self.steps_per_epoch * self.train.epochs

    @property
    def backend_label(self) -> str:
        return f"{self.backend}:{self.variant}" if self.variant else self.backend

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        data = dict(data)
        train = dict(data["train"])
        train["optimizer"] = OptimizerSpec(**train["optimizer"])
        dataset = dict(data["dataset"])
        if dataset.get("shape") is not None:
            dataset["shape"] = tuple(dataset["shape"])
        federated = data.get("federated")
        if federated is not None:
            clipping = federated.get("adaptive_clipping")
            federated = FederatedConfig(
                **{
                    **federated,
                    "partition": PartitionSpec(**federated["partition"]),
                    "server_optimizer": OptimizerSpec(**federated["server_optimizer"]),
                    "adaptive_clipping": AdaptiveClipping(**clipping) if clipping is not None else None,
                }
            )
        audit = data.get("audit")
        return cls(
            **{
                **data,
                "audit": AuditConfig(**audit) if audit is not None else None,
                "federated": federated,
                "dataset": DatasetSpec(**dataset),
                "train": TrainConfig(**train),
                "dp": DPConfig(**data["dp"]),
                "perf": PerfFlags(**data["perf"]),
            }
        )

    @property
    def identity(self) -> dict[str, Any]:
        """What determines the numbers: everything but the suite name and perf flags."""
        d = self.to_dict()
        for key in ("suite", "perf"):
            d.pop(key)
        for key in ("federated", "audit"):
            if d[key] is None:
                d.pop(key)  # keeps the run_ids of runs without them as they were
        d["dp"].pop("target_epsilon")  # the calibrated noise_multiplier is what counts
        return d

    @property
    def run_id(self) -> str:
        blob = json.dumps({**self.identity, "threads": self.perf.threads}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
