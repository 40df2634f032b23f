"""Read a results tree for reports and comparisons: every readable Parquet file, whatever its schema version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from bench.results import SCHEMA, SCHEMA_VERSION, read_table


class ResultsError(Exception):
    """ResultSet that cannot be read at all: the message names the path and what was expected."""


@dataclass(frozen=True, kw_only=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True, kw_only=True)
class ResultSet:
    """One row per run and epoch, in the current schema's columns, plus the files that could not be read."""

    frame: pd.DataFrame
    source: Path
    files: int
    skipped: tuple[SkippedFile, ...] = ()


def _result_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # `_logs` holds worker logs and probes; dot-files are a writer's temporary files.
    return sorted(
        p for p in path.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )


# What every result file has had since the first schema; without them a file is not a bench result.
REQUIRED = ("run_id", "suite", "workload", "backend", "status")


def _column(table: pa.Table, field: pa.Field) -> pa.ChunkedArray:
    """A column in its schema type: a file whose column holds something else (text for a number) is not read."""
    column = table.column(field.name)
    if column.type.equals(field.type):
        return column
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        if pa.types.is_timestamp(field.type) and pa.types.is_timestamp(column.type):
            return column.cast(field.type, safe=False)  # a finer clock: drop the sub-millisecond part
        raise ValueError(f"column {field.name!r} holds {column.type}, expected {field.type}") from None


def _read_one(path: Path) -> pd.DataFrame:
    """One result file in the current schema's column types; ValueError says why a file is not a readable result."""
    table = read_table(path)  # one descriptor: whole even while a sweep renames a new version over it
    if table.num_rows == 0:
        raise ValueError("no rows (a result file has one row per epoch, or one for a run that ended before any)")
    names = set(table.column_names)
    if len(names) != len(table.column_names):
        raise ValueError("duplicate column names")
    if "schema_version" in names:
        versions = _column(table, SCHEMA.field("schema_version")).drop_null().to_pylist()
        if versions and max(versions) > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {max(versions)} is newer than this bench reads ({SCHEMA_VERSION}): upgrade bench"
            )
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ValueError(f"not a bench result file: no {', '.join(missing)} column")
    columns = {f.name: _column(table, f) for f in SCHEMA if f.name in names}
    for name in ("run_id", "status"):
        if columns[name].null_count:
            raise ValueError(f"not a bench result file: rows without a {name}")
    frame = pa.table(columns).to_pandas()
    if "schema_version" not in frame:
        frame["schema_version"] = 0
    return frame


def load_results(path: Path | str, *, suite: str | None = None) -> ResultSet:
    """Every result under `path` (a results folder or one Parquet file); unreadable files are listed, not fatal.

    Columns that an older schema version lacks are added empty, so every report sees the current columns.
    """
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{path}: no such file or folder (expected a results folder written by `bench run`)")
    files = _result_files(path)
    if not files:
        raise ResultsError(f"{path}: no result files (*.parquet) found; run a suite first, e.g. `bench run quickstart`")
    frames, skipped = [], []
    for f in files:
        try:
            frames.append(_read_one(f))
        except (OSError, ValueError, pa.ArrowException) as e:
            skipped.append(SkippedFile(path=f, reason=f"{type(e).__name__}: {e}"))
    if not frames:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        raise ResultsError(f"{path}: none of the {len(files)} result files could be read ({reasons})")
    frame = pd.concat(frames, ignore_index=True)
    for field in SCHEMA:
        if field.name not in frame:
            frame[field.name] = pa.nulls(len(frame), field.type).to_pandas()  # an int column of nulls: NaN floats
    frame["workload_kind"] = frame["workload_kind"].fillna("centralized")  # schema 1 had DP-SGD runs only
    if suite is not None:
        suites = sorted(frame["suite"].dropna().unique())
        frame = frame[frame["suite"] == suite]
        if frame.empty:
            raise ResultsError(f"{path}: no runs of suite {suite!r}; suites with results there: {', '.join(suites)}")
    return ResultSet(frame=frame.reset_index(drop=True), source=path, files=len(files), skipped=tuple(skipped))
