"""Synthetic result rows in the real schema, for report and comparison tests."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from bench.results import SCHEMA, write_rows


def run_rows(
    *,
    run_id: str,
    backend: str = "jax",
    variant: str = "vmap",
    seed: int = 0,
    dp: bool = True,
    target_epsilon: float | None = 1.0,
    noise_multiplier: float | None = 1.2,
    accuracies: tuple[float, ...] = (0.5, 0.7),
    seconds: tuple[float, ...] = (10.0, 2.0),
    memory: tuple[float, ...] = (100.0, 120.0),
    epsilons: tuple[float, ...] = (0.6, 1.0),
    epsilons_rdp: tuple[float, ...] = (0.8, 1.2),
    epsilons_reported: tuple[float | None, ...] = (None, None),
    status: str = "ok",
    error: str = "",
    suite: str = "s",
    workload: str = "w",
    sampling: str = "poisson",
    **overrides: Any,
) -> list[dict[str, Any]]:
    """One row per epoch, as `bench run` writes them; a run with no epochs gets one row with epoch None."""
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    base = {
        "run_id": run_id,
        "suite": suite,
        "workload": workload,
        "dataset": "synthetic",
        "model": "mlp",
        "backend": backend,
        "variant": variant,
        "seed": seed,
        "dp": dp,
        "noise_multiplier": noise_multiplier if dp else None,
        "target_epsilon": target_epsilon if dp else None,
        "max_grad_norm": 1.0 if dp else None,
        "batch_size": 128,
        "physical_batch_size": 160,
        "sampling": sampling,
        "sample_rate": 0.125,
        "delta": 1e-5 if dp else None,
        "epochs": len(accuracies),
        "steps_per_epoch": 8,
        "dataset_size": 1024,
        "optimizer": "sgd",
        "learning_rate": 0.5,
        "augment": False,
        "status": status,
        "error": error,
        "versions": '{"jax": "0.10.2"}',
        "python": "3.11.7",
        "hardware": "test cpu",
        "threads": 2,
        "git_commit": "abc123",
        "started_at": now,
        "finished_at": now,
        "accounting_note": "",
        **overrides,
    }
    base.setdefault("spec", json.dumps(_spec(base)))
    if not accuracies:
        return [{**base, "epoch": None}]
    rows = []
    for i, acc in enumerate(accuracies):
        rows.append(
            {
                **base,
                "epoch": i + 1,
                "steps": 8 * (i + 1),
                "test_accuracy": acc,
                "epoch_seconds": seconds[i],
                "train_seconds": seconds[i],
                "peak_memory_mb": memory[i],
                "epsilon": epsilons[i] if dp else None,
                "epsilon_rdp": epsilons_rdp[i] if dp else None,
                "epsilon_reported": epsilons_reported[i] if dp else None,
            }
        )
    return rows


def _spec(row: dict[str, Any]) -> dict[str, Any]:
    """The run's spec as `bench run` stores it, reduced to the fields that matching looks at."""
    return {
        "suite": row["suite"],
        "workload": row["workload"],
        "backend": row["backend"],
        "variant": row["variant"],
        "seed": row["seed"],
        "model": row["model"],
        "dataset": {"name": row["dataset"]},
        "dataset_size": row["dataset_size"],
        "dp": {
            "enabled": row["dp"],
            "noise_multiplier": row["noise_multiplier"],
            "target_epsilon": row["target_epsilon"],
            "max_grad_norm": row["max_grad_norm"],
            "delta": row["delta"],
            "sampling": row["sampling"],
        },
        "train": {
            "batch_size": row["batch_size"],
            "epochs": row["epochs"],
            "optimizer": {"name": row["optimizer"], "learning_rate": row["learning_rate"]},
        },
        "perf": {"threads": row["threads"]},
    }


def frame(*runs: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as the report reads them: through the Parquet schema, so dtypes match real files."""
    import pyarrow as pa

    rows = [{**r, "schema_version": 1} for run in runs for r in run]
    return pa.Table.from_pylist(rows, schema=SCHEMA).to_pandas()


def write(results: Path, *runs: list[dict[str, Any]]) -> None:
    for run in runs:
        write_rows(results / run[0]["suite"].replace("/", "_") / f"{run[0]['run_id']}.parquet", run)


def fed_accuracy(r: int, top: float = 0.8) -> float:
    """A federated run's test accuracy after round r: rises towards `top`."""
    return round(top - 0.3 / r, 6)


def fed_clip(r: int) -> float:
    """The adaptive clip norm used in round r: shrinks from the initial 0.1."""
    return round(0.1 * 0.9**r, 8)


def fed_seconds(r: int) -> float:
    """Whole-round seconds: the first round compiles."""
    return 5.0 if r == 1 else 1.0 + 0.1 * r


def federated_rows(
    *,
    run_id: str,
    noise_multiplier: float | None = 0.5,
    target_epsilon: float | None = None,
    clients_per_round: int = 50,
    total_clients: int = 3383,
    rounds: int = 20,
    eval_every: int = 5,
    final_epsilon: float = 4.0,
    top: float = 0.8,
    done: int | None = None,
    dp: bool = True,
    suite: str = "fed",
    workload: str = "fedavg",
    **overrides: Any,
) -> list[dict[str, Any]]:
    """One row per round of a DP-FedAvg run as `bench run` writes them (`done` rounds finished, default all).

    Test accuracy on every `eval_every`-th round and the last planned one; ε grows as sqrt(round), inf for
    noise 0; clip norm `fed_clip`, round seconds `fed_seconds`, local training 80% of a round.
    """
    n = rounds if done is None else done
    steps = range(1, n + 1)
    infinite = dp and not noise_multiplier
    eps = [math.inf if infinite else final_epsilon * math.sqrt(r / rounds) for r in steps]
    rows = run_rows(
        run_id=run_id,
        dp=dp,
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        accuracies=tuple(fed_accuracy(r, top) for r in steps),
        seconds=tuple(fed_seconds(r) for r in steps),
        memory=(100.0,) * n,
        epsilons=tuple(eps),
        epsilons_rdp=tuple(e * 1.1 for e in eps),
        epsilons_reported=(None,) * n,
        suite=suite,
        workload=workload,
        **{
            "batch_size": 32,
            "epochs": 1,
            "max_grad_norm": 0.1 if dp else None,
            "sample_rate": clients_per_round / total_clients,
            "learning_rate": 0.01,
            "workload_kind": "federated",
            "total_clients": total_clients,
            "clients_per_round": clients_per_round,
            "rounds": rounds,
            **overrides,
        },
    )
    for row in rows:
        r = row["epoch"]
        if r is None:
            continue
        evaluated = r % eval_every == 0 or r == rounds
        row.update(
            steps=r,
            test_accuracy=row["test_accuracy"] if evaluated else None,
            test_loss=1.0 - row["test_accuracy"] if evaluated else None,
            train_seconds=0.8 * row["epoch_seconds"],
            sampled_clients=clients_per_round,
            clip_norm=fed_clip(r) if dp else None,
            unclipped_fraction=0.5 if dp else None,
        )
    return rows
