"""Synthetic result rows in the real schema, for report and comparison tests."""

from __future__ import annotations

import json
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
