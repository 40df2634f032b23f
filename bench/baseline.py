"""Baselines: a results set frozen under `baselines/NAME/` (one Parquet file, micro-benchmarks, a manifest)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.compare import BENCHMARKS_DIR, benchmark_files
from bench.resultset import ResultsError, load_results

BASELINES_DIR = Path(__file__).resolve().parent.parent / "baselines"


def resolve(name_or_path: str, root: Path = BASELINES_DIR) -> Path:
    """A results folder or Parquet file as given, else the saved baseline of that name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    saved = root / name_or_path
    if saved.is_dir():
        return saved
    known = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) if root.is_dir() else "none"
    raise ResultsError(
        f"{name_or_path}: no such results folder or file, and no saved baseline of that name in {root} "
        f"(saved: {known}; create one with `bench baseline save NAME RESULTS`)"
    )


def save(results: Path, name: str, *, suite: str | None = None, root: Path = BASELINES_DIR) -> Path:
    """Freeze the readable results under `results` (one suite if given) as baseline `name`; replaces an old one."""
    if not name or "/" in name or name.startswith((".", "_")):
        raise ResultsError(f"baseline name: got {name!r}, expected a plain name such as 'ci'")
    loaded = load_results(results, suite=suite)
    dest = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    frame = loaded.frame.sort_values(["suite", "workload", "run_id", "epoch"], na_position="first")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / "results.parquet")
    benchmarks = benchmark_files(Path(results))
    if benchmarks:
        (tmp / BENCHMARKS_DIR).mkdir()
        for f in benchmarks:
            shutil.copy2(f, tmp / BENCHMARKS_DIR / f.name)
    manifest = {
        "name": name,
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(results),
        "suites": sorted(loaded.frame["suite"].dropna().unique().tolist()),
        "runs": int(loaded.frame["run_id"].nunique()),
        "statuses": {
            str(k): int(v) for k, v in loaded.frame.drop_duplicates("run_id")["status"].value_counts().items()
        },
        "hardware": sorted(loaded.frame["hardware"].dropna().unique().tolist()),
        "git_commits": sorted(loaded.frame["git_commit"].dropna().unique().tolist()),
        "benchmarks": [f.name for f in benchmarks],
        "skipped_files": [f"{s.path}: {s.reason}" for s in loaded.skipped],
    }
    (tmp / "baseline.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return dest
