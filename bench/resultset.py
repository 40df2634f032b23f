"""Read a results tree for reports and comparisons: every readable Parquet file, whatever its schema version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bench.results import SCHEMA, SCHEMA_VERSION


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


def _read_one(path: Path) -> pd.DataFrame:
    table = pq.read_table(path)
    frame = table.to_pandas()
    if "schema_version" not in frame:
        frame["schema_version"] = 0
    versions = set(frame["schema_version"].dropna().astype(int))
    if versions and max(versions) > SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {max(versions)} is newer than this bench reads ({SCHEMA_VERSION}): upgrade bench"
        )
    if "run_id" not in frame or "status" not in frame:
        raise ValueError("not a bench result file: no run_id or status column")
    return frame


def _empty_dtype(kind: pa.DataType) -> str:
    """A pandas dtype that holds an all-missing column of this Arrow type (numpy ints and bools cannot)."""
    if pa.types.is_integer(kind):
        return "Int64"
    if pa.types.is_floating(kind):
        return "float64"
    if pa.types.is_boolean(kind):
        return "boolean"
    return "object"


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
            frame[field.name] = pd.Series([None] * len(frame), dtype=_empty_dtype(field.type), index=frame.index)
    frame["workload_kind"] = frame["workload_kind"].fillna("centralized")  # schema 1 had DP-SGD runs only
    if suite is not None:
        suites = sorted(frame["suite"].dropna().unique())
        frame = frame[frame["suite"] == suite]
        if frame.empty:
            raise ResultsError(f"{path}: no runs of suite {suite!r}; suites with results there: {', '.join(suites)}")
    return ResultSet(frame=frame.reset_index(drop=True), source=path, files=len(files), skipped=tuple(skipped))
