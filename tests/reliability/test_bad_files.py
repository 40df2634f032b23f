"""Bad files in a results tree: `bench report` and `bench compare` (run as the CLI, in subprocesses) skip and list
each file they cannot read, with its reason, on stderr, and report the rest; files of an older schema version read.

The good files are written by the real writer (`bench.runner.build_rows` + `bench.results.write_rows`) from runs
of a loaded suite; the bad ones beside them are: the first half of a real result file, random bytes (plain and
between Parquet's magic bytes), an empty file, a Parquet file that is not a bench result, one with the result
columns in the wrong types, a folder named like a result file, and a result of schema version 99. One run's file
is written in schema version 1 (no federated columns, a spec without the `federated` field), as bench wrote them
before federated runs; a baseline entirely in schema 1 must still match the same runs written today.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from bench.compare import compare
from bench.results import SCHEMA, result_path, write_rows
from bench.resultset import ResultsError, load_results
from bench.runner import build_rows
from bench.spec import RunSpec
from bench.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
FEDERATED_COLUMNS = ("workload_kind", "total_clients", "clients_per_round", "rounds")
FEDERATED_COLUMNS += ("sampled_clients", "clip_norm", "unclipped_fraction")
SCHEMA_V1 = pa.schema([f for f in SCHEMA if f.name not in FEDERATED_COLUMNS])


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _events(run: RunSpec, accuracies: list[float]) -> list[dict]:
    events = [
        {"event": "start", "time": 0.0, "python": "3.11.7"},
        {"event": "built", "time": 0.5, "seconds": 0.5, "versions": {"jax": "0.10.2"}},
        {"event": "compiled", "time": 1.0, "seconds": 0.4},
    ]
    for epoch, acc in enumerate(accuracies, 1):
        events.append(
            {
                "event": "epoch",
                "epoch": epoch,
                "steps": epoch * run.steps_per_epoch,
                "examples": 200,
                "train_loss": 1.0 / epoch,
                "train_accuracy": acc,
                "test_loss": 1.0 / epoch,
                "test_accuracy": acc,
                "train_seconds": 0.2,
                "epoch_seconds": 0.25,
                "physical_batch_size": 64,
                "peak_memory_mb": 300.0,
                "compilations": 1,
                "epsilon_reported": None,
            }
        )
    return [*events, {"event": "end", "status": "ok", "error": ""}]


def _rows(run: RunSpec) -> list[dict]:
    return build_rows(run, _events(run, [0.6, 0.8]), "ok", "", 0.0)


def write_v1(path: Path, rows: list[dict]) -> None:
    """A result file as bench wrote it in schema version 1: no federated columns, no `federated` in the spec."""
    old = []
    for r in rows:
        spec = json.loads(r["spec"])
        spec.pop("federated")
        old.append({**{k: v for k, v in r.items() if k not in FEDERATED_COLUMNS}, "spec": json.dumps(spec)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{**r, "schema_version": 1} for r in old], schema=SCHEMA_V1), path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[RunSpec]:
    suite = {
        "name": "files",
        "backends": ["jax"],
        "seeds": [0, 1],
        "workloads": [
            {
                "name": "w",
                "dataset": {"name": "synthetic", "train_size": 200, "test_size": 40, "shape": [4, 4, 1]},
                "model": "mlp",
                "train": {"epochs": 2, "batch_size": 50},
                "privacy": [{"dp": False}, {"noise_multiplier": 1.0}],
            }
        ],
    }
    path = tmp_path_factory.mktemp("suite") / "files.yaml"
    path.write_text(yaml.safe_dump(suite))
    return list(load_suite(path).runs)  # non-private seeds 0, 1; sigma 1 seeds 0, 1


BAD = {
    "truncated.parquet": "first half of a real result file",
    "random.parquet": "random bytes",
    "random-magic.parquet": "random bytes between PAR1 magic bytes",
    "empty.parquet": "an empty file",
    "foreign.parquet": "a Parquet file that is not a bench result",
    "wrong-types.parquet": "result columns of the wrong types",
    "folder.parquet": "a folder",
    "future.parquet": "schema version 99",
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory, runs: list[RunSpec]) -> dict[str, Path]:
    """`current`: three runs in schema 2, the fourth in schema 1, and every bad file; `baseline`: all four runs in
    schema 1 (a baseline saved before federated runs existed, like the committed baselines/ci)."""
    root = tmp_path_factory.mktemp("trees")
    current, baseline = root / "current", root / "baseline"
    for run in runs[:3]:
        write_rows(result_path(current, run.suite, run.run_id), _rows(run))
    old = runs[3]
    write_v1(result_path(current, old.suite, old.run_id), _rows(old))
    for run in runs:
        write_v1(result_path(baseline, run.suite, run.run_id), _rows(run))

    folder = current / "junk"
    folder.mkdir()
    good = result_path(current, runs[0].suite, runs[0].run_id).read_bytes()
    (folder / "truncated.parquet").write_bytes(good[: len(good) // 2])
    (folder / "random.parquet").write_bytes(os.urandom(4096))
    (folder / "random-magic.parquet").write_bytes(b"PAR1" + os.urandom(4096) + (100).to_bytes(4, "little") + b"PAR1")
    (folder / "empty.parquet").write_bytes(b"")
    pq.write_table(
        pa.table({"city": ["Oslo", "Lima"], "population": [709_000, 10_000_000]}), folder / "foreign.parquet"
    )
    wrong = {**_rows(runs[1])[0], "run_id": "wrong-types", "epoch": "one", "test_accuracy": "high"}
    pq.write_table(pa.Table.from_pylist([wrong]), folder / "wrong-types.parquet")
    (folder / "folder.parquet").mkdir()
    future = [{**r, "run_id": "from-the-future", "schema_version": 99} for r in _rows(runs[1])]
    pq.write_table(pa.Table.from_pylist(future), folder / "future.parquet")
    return {"current": current, "baseline": baseline}


def _skipped_lines(stderr: str) -> dict[str, str]:
    """file name -> the warning line that names it."""
    out = {}
    for line in stderr.splitlines():
        for name in BAD:
            if f"{name}:" in line:
                out[name] = line
    return out


def _assert_every_bad_file_listed(stderr: str) -> None:
    lines = _skipped_lines(stderr)
    assert set(lines) == set(BAD), stderr
    assert all(line.startswith("warning: skipped") for line in lines.values())
    assert "newer than this bench reads" in lines["future.parquet"]
    assert "not a bench result file" in lines["foreign.parquet"]
    assert "column 'epoch' holds string" in lines["wrong-types.parquet"]
    assert "Traceback" not in stderr


def test_the_reader_skips_each_bad_file_with_its_reason(trees, runs):
    results = load_results(trees["current"])
    assert {s.path.name for s in results.skipped} == set(BAD)
    assert set(results.frame["run_id"]) == {r.run_id for r in runs}  # three in schema 2, one in schema 1
    old = results.frame[results.frame["run_id"] == runs[3].run_id]
    assert set(old["schema_version"]) == {1} and set(old["workload_kind"]) == {"centralized"}
    assert old["clients_per_round"].isna().all()


@pytest.mark.parametrize("fmt", ["html", "md"])
def test_report_lists_the_bad_files_and_reports_the_rest(trees, runs, tmp_path, fmt):
    out = tmp_path / f"report.{fmt}"
    proc = bench("report", str(trees["current"]), "--format", fmt, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _assert_every_bad_file_listed(proc.stderr)
    text = out.read_text()
    assert "4 runs (4 ok)" in text and "8 result files could not be read" in text
    if fmt == "html":
        for run in runs:  # the schema 1 run too
            assert f"<code>{run.run_id}</code>" in text
        assert "folder.parquet" in text and "newer than this bench reads" in text
    else:
        assert "| jax:bk | 0.8000 ± 0.0000 (n=2) | 0.8000 ± 0.0000 (n=2) |" in text  # one seed read from schema 1


@pytest.mark.parametrize("fmt", ["json"])
def test_compare_lists_the_bad_files_and_matches_an_old_schema_baseline(trees, tmp_path, fmt):
    proc = bench("compare", str(trees["current"]), "--baseline", str(trees["baseline"]), "--format", fmt, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # PASS: the same runs, whatever schema wrote them
    _assert_every_bad_file_listed(proc.stderr)
    if fmt == "json":
        doc = json.loads(proc.stdout)
        assert doc["passed"] and {"missing", "new", "regression"}.isdisjoint(doc["counts"])
        assert doc["counts"]["ok"] >= 4 + 2 + 2  # a status per run, epsilon and noise, accuracy per level
        assert len(doc["skipped_files"]) == len(BAD)
    else:
        assert "PASS" in proc.stdout


def test_a_schema_1_baseline_matches_todays_runs_in_process(trees):
    """The committed baselines/ci is schema 1: without matching through the missing `federated` field, every
    run of it was 'missing' and every current run 'new'."""
    result = compare(load_results(trees["current"]), load_results(trees["baseline"]))
    assert result.exit_code == 0 and not result.failed
    assert {c.verdict.value for c in result.checks} <= {"ok", "info"}


def test_a_tree_of_nothing_but_bad_files_is_a_clean_error(trees, tmp_path):
    only_bad = tmp_path / "bad"
    shutil.copytree(trees["current"] / "junk", only_bad)
    proc = bench("report", str(only_bad), "--format", "md", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "none of the 8 result files could be read" in proc.stderr
    proc = bench("compare", str(trees["current"]), "--baseline", str(only_bad), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "could be read" in proc.stderr


def _table(**columns) -> pa.Table:
    return pa.table(columns)


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        (_table(run_id=pa.array([], pa.string()), status=pa.array([], pa.string())), "no rows"),
        (_table(run_id=["a"], status=["ok"]), "no suite, workload, backend column"),
        (_table(run_id=[None], suite=["s"], workload=["w"], backend=["jax"], status=["ok"]), "rows without a run_id"),
        (_table(run_id=["a"], suite=["s"], workload=["w"], backend=["jax"], status=[3]), None),  # an int casts
        (_table(run_id=["a"], suite=["s"], workload=["w"], backend=["jax"], status=["ok"], seed=["x"]), "'seed'"),
        (_table(run_id=["a"], suite=["s"], workload=["w"], backend=["jax"], status=["ok"], dp=[[1, 2]]), "'dp'"),
        (_table(schema_version=["two"], run_id=["a"], status=["ok"]), "'schema_version'"),
    ],
)
def test_odd_tables_are_read_in_the_schema_types_or_skipped(tmp_path, trees, table, reason):
    folder = tmp_path / "tree"
    shutil.copytree(trees["current"], folder, ignore=shutil.ignore_patterns("junk"))
    pq.write_table(table, folder / "odd.parquet")
    results = load_results(folder)
    skipped = {s.path.name: s.reason for s in results.skipped}
    if reason is None:
        assert "odd.parquet" not in skipped
        assert results.frame["status"].map(type).eq(str).all()
    else:
        assert reason in skipped["odd.parquet"]


def test_a_run_without_a_spec_is_left_out_of_compare_not_fatal(trees, tmp_path):
    folder = tmp_path / "tree"
    shutil.copytree(trees["current"], folder, ignore=shutil.ignore_patterns("junk"))
    pq.write_table(
        _table(run_id=["nospec"], suite=["s"], workload=["w"], backend=["jax"], status=["ok"]), folder / "x.parquet"
    )
    result = compare(load_results(folder), load_results(trees["baseline"]))
    assert result.exit_code == 0
    assert any("nospec" in s and "cannot be matched" in s for s in result.skipped_files)
    with pytest.raises(ResultsError):  # and a side with nothing matchable is unusable, as before
        only = tmp_path / "only"
        only.mkdir()
        pq.write_table(
            _table(run_id=["nospec"], suite=["s"], workload=["w"], backend=["jax"], status=["ok"]), only / "x.parquet"
        )
        compare(load_results(only), load_results(trees["baseline"]))
