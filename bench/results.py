"""Versioned Arrow schema and atomic Parquet writes: one file per run, one row per epoch; the per-run lock."""

from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# 2: federated runs (workload_kind and the per-round columns); 3: one-run audits (the canary columns).
# Files of every older version still read (bench.resultset adds the columns they lack, empty).
SCHEMA_VERSION = 3
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
        # one-run audits only (null otherwise), on the last epoch's row: every canary's score under the final model
        # (its log-likelihood of the canary label) and whether it was trained on; bench audit scores them.
        ("canary_kind", pa.string()),
        ("canary_scores", pa.list_(pa.float64())),
        ("canary_included", pa.list_(pa.bool_())),
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


def write_rows(
    path: Path, rows: list[dict[str, Any]], schema: pa.Schema = SCHEMA, version: int = SCHEMA_VERSION
) -> None:
    """Write rows (of `schema`, stamped with its `version`) atomically: a temp file in the same folder, synced, then
    renamed over the target.

    Whatever fails on the way (a full disk, an interrupt), the target keeps its previous content or stays
    absent, and the temp file (a dot-file that no reader lists) is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{**r, "schema_version": version} for r in rows], schema=schema)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)  # the rename itself survives a crash of the machine


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Temp files of `path` that a killed writer left behind; call only while holding the run's lock."""
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def lock_path(results_dir: Path, suite: str, run_id: str) -> Path:
    return Path(results_dir) / suite_folder(suite) / "_locks" / f"{run_id}.lock"  # "_": dataset reads skip it


class RunLock:
    """An exclusive lock on one run_id in a results folder, so that two `bench run` never execute it at once.

    `flock` on `<results>/<suite>/_locks/<run_id>.lock`: the kernel releases it when the holder closes it or
    dies, however it dies, so a lock file left behind never blocks anyone. The holder writes its pid and host
    into the file for the message of whoever finds it taken. Lock files are not removed (removing one while
    another process opens it would let two processes hold "the" lock)."""

    _WIDTH = 200

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, *, wait: bool = False) -> bool:
        """Take the lock; without `wait`, False at once when another process holds it."""
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:  # an interrupt while waiting
            os.close(fd)
            raise
        holder = f"{os.getpid()} {socket.gethostname()}"[: self._WIDTH - 1].ljust(self._WIDTH - 1) + "\n"
        os.pwrite(fd, holder.encode(), 0)  # one fixed-size write: a reader sees the old holder or the new one
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def holder(self) -> str:
        """'pid N' (on another host: 'pid N on HOST') of the process that holds or last held the lock."""
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
        except OSError:
            return "pid unknown"
        if not pid:
            return "pid unknown"
        return f"pid {pid}" if host in ("", socket.gethostname()) else f"pid {pid} on {host}"

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One result file, read through a single open descriptor. `pq.read_table(path)` opens the path more than
    once (footer, then data): if a writer renames a new version over it in between, it mixes the two and fails
    ("Page was smaller than expected"). One descriptor keeps reading the version it opened."""
    with pa.OSFile(str(path)) as f:
        return pq.read_table(f, columns=columns)


def read_status(path: Path) -> str | None:
    """The status recorded in a result file, or None when it is missing or unreadable."""
    try:
        col = read_table(path, columns=["status"]).column("status")
    except (OSError, pa.ArrowException):
        return None
    return col[0].as_py() if len(col) else None


def read_results(results_dir: Path) -> pa.Table:
    """Every result file under a folder as one table (pandas: `.to_pandas()`); like `bench.resultset`, it skips
    `_`-prefixed folders (logs, locks) and dot-files (a writer's temp files)."""
    root = Path(results_dir)
    files = sorted(
        f for f in root.rglob("*.parquet") if not any(p.startswith((".", "_")) for p in f.relative_to(root).parts)
    )
    tables = [read_table(f) for f in files]
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")
