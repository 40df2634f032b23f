"""Versioned Arrow schema and atomic Parquet writes: one file per run, one row per epoch."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2  # 2: federated runs (workload_kind and the per-round columns); version 1 files still read
STATUSES = ("ok", "failed", "oom", "timeout", "diverged", "unsupported", "interrupted")

SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        # identity
        ("run_id", pa.string()),
        ("suite", pa.string()),
        ("workload", pa.string()),
        ("dataset", pa.string()),
        ("model", pa.string()),
        ("backend", pa.string()),
        ("variant", pa.string()),
        ("seed", pa.int64()),
        # configuration
        ("dp", pa.bool_()),
        ("noise_multiplier", pa.float64()),
        ("target_epsilon", pa.float64()),
        ("max_grad_norm", pa.float64()),
        ("batch_size", pa.int64()),
        ("physical_batch_size", pa.int64()),
        ("sampling", pa.string()),
        ("sample_rate", pa.float64()),
        ("delta", pa.float64()),
        ("epochs", pa.int64()),
        ("steps_per_epoch", pa.int64()),
        ("dataset_size", pa.int64()),
        ("optimizer", pa.string()),
        ("learning_rate", pa.float64()),
        ("augment", pa.bool_()),
        # federated runs only (null for DP-SGD runs): one row per round, `epoch` is the round
        ("workload_kind", pa.string()),  # "centralized" (DP-SGD) or "federated" (DP-FedAvg)
        ("total_clients", pa.int64()),
        ("clients_per_round", pa.int64()),
        ("rounds", pa.int64()),
        ("sampled_clients", pa.int64()),
        ("clip_norm", pa.float64()),
        ("unclipped_fraction", pa.float64()),
        # metrics, per epoch
        ("epoch", pa.int64()),
        ("steps", pa.int64()),
        ("examples", pa.int64()),
        ("train_loss", pa.float64()),
        ("train_accuracy", pa.float64()),
        ("test_loss", pa.float64()),
        ("test_accuracy", pa.float64()),
        ("train_seconds", pa.float64()),
        ("epoch_seconds", pa.float64()),
        ("compile_seconds", pa.float64()),
        ("examples_per_second", pa.float64()),
        ("peak_memory_mb", pa.float64()),
        ("compilations", pa.int64()),
        ("epsilon", pa.float64()),
        ("epsilon_rdp", pa.float64()),
        ("epsilon_reported", pa.float64()),
        ("accounting_note", pa.string()),
        # status
        ("status", pa.string()),
        ("error", pa.string()),
        # provenance
        ("versions", pa.string()),
        ("python", pa.string()),
        ("hardware", pa.string()),
        ("threads", pa.int64()),
        ("git_commit", pa.string()),
        ("started_at", pa.timestamp("ms", tz="UTC")),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
        ("spec", pa.string()),
    ]
)


def suite_folder(name: str) -> str:
    """A file-system-safe folder name for a suite (the suite's name itself may be anything)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "suite"
    return s[:80]


def result_path(results_dir: Path, suite: str, run_id: str) -> Path:
    return Path(results_dir) / suite_folder(suite) / f"{run_id}.parquet"


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows atomically: a temp file in the same folder, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{**r, "schema_version": SCHEMA_VERSION} for r in rows], schema=SCHEMA)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_status(path: Path) -> str | None:
    """The status recorded in a result file, or None when it is missing or unreadable."""
    try:
        col = pq.read_table(path, columns=["status"]).column("status")
    except (OSError, pa.ArrowException):
        return None
    return col[0].as_py() if len(col) else None


def read_results(results_dir: Path) -> pa.Table:
    """Every result file under a folder as one table (pandas: `.to_pandas()`)."""
    files = sorted(Path(results_dir).rglob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")
