"""Numbers that must not lie: a run whose loss becomes non-finite is `diverged` (no accuracy reported for it), a
run short of its planned epochs is not `ok`, and an epsilon is never shown for a run whose sampling the accountant
does not model without the mark (†).

The first tests run a real `bench run` of a tiny suite on the jax backend's environment (synthetic data, mlp, a
few seconds per run): a DP run with a learning rate of 1e30 diverges, a shuffle-sampled DP run is marked.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench import accounting, worker
from bench.backend import StepStats
from bench.data.prepare import Dataset
from bench.envs import is_ready
from bench.report import make_report, render, tables
from bench.results import read_status, result_path
from bench.resultset import load_results
from bench.runner import SHUFFLE_NOTE, Runner, _finish_status, build_rows
from bench.spec import DPConfig, FederatedConfig, PartitionSpec, RunSpec, SpecError, TrainConfig
from bench.suite import SuiteError, load_suite

from .conftest import small_run

REPO = Path(__file__).resolve().parents[2]
DATA = {"name": "synthetic", "train_size": 256, "test_size": 64, "shape": [8, 8, 1], "num_classes": 4}
TRAIN = {"epochs": 2, "batch_size": 64, "optimizer": {"name": "sgd", "learning_rate": 0.1}}
SUITE = {
    "name": "numbers",
    "backends": ["jax"],
    "seeds": [0],
    "threads": 1,
    "timeout": 300,
    "workloads": [
        {
            "name": "poisson",
            "dataset": DATA,
            "model": "mlp",
            "train": TRAIN,
            "dp": {"max_grad_norm": 1.0, "delta": 1.0e-5},
            "privacy": [
                {"noise_multiplier": 1.0},
                {"noise_multiplier": 2.0, "learning_rate": 1.0e30},  # the weights overflow float32: NaN loss
            ],
        },
        {
            "name": "shuffled",
            "dataset": DATA,
            "model": "mlp",
            "train": TRAIN,
            "dp": {"max_grad_norm": 1.0, "delta": 1.0e-5, "sampling": "shuffle"},
            "privacy": [{"noise_multiplier": 1.0}],
        },
    ],
}
DIVERGING = "σ=2"


def bench(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The suite run for real, then reported in HTML and Markdown."""
    if not is_ready("jax"):
        pytest.skip("the jax environment is not created (bench env create jax)")
    root = tmp_path_factory.mktemp("numbers")
    suite = root / "numbers.yaml"
    suite.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(root / "cache")}
    results = root / "results"
    ran = bench("run", str(suite), "--results", str(results), cwd=root, env=env)
    html = bench("report", str(results), "--out", str(root / "report.html"), cwd=root, env=env)
    md = bench("report", str(results), "--format", "md", cwd=root, env=env)
    assert html.returncode == 0 and md.returncode == 0, html.stderr + md.stderr
    return {
        "run": ran,
        "rows": load_results(results).frame,
        "html": (root / "report.html").read_text(),
        "md": md.stdout,
    }


def _runs_table(page: str) -> list[list[str]]:
    body = page.split('<table class="runs">')[1].split("</tbody>")[0]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]]


def _chart_rows(page: str) -> list[dict]:
    blocks = re.findall(r'<script type="application/json" data-chart-for="[^"]+">(.*?)</script>', page, re.S)
    return [row for b in blocks for rows in json.loads(b).get("datasets", {}).values() for row in rows]


def test_the_sweep_ends_with_one_diverged_run(sweep):
    proc = sweep["run"]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not every run ended ok
    assert "3 runs: 1 diverged, 2 ok" in proc.stdout, proc.stdout


def test_a_non_finite_loss_is_diverged_with_no_accuracy(sweep):
    rows = sweep["rows"]
    runs = tables.runs(rows)
    bad = runs[runs["status"] != "ok"]
    assert list(bad["privacy"]) == [DIVERGING] and list(bad["status"]) == ["diverged"]
    assert "non-finite" in bad["error"].iloc[0]
    diverged = rows[rows["run_id"] == bad["run_id"].iloc[0]]
    assert diverged["test_accuracy"].isna().all() and diverged["train_loss"].isna().all()
    assert diverged["epsilon"].isna().all()  # no epoch finished, so no privacy was spent on a result
    ok = rows[rows["status"] == "ok"]
    assert ok["test_accuracy"].notna().all() and np.isfinite(ok["train_loss"]).all()


def test_the_report_lists_the_diverged_run_as_a_problem_and_charts_none_of_it(sweep):
    page, md = sweep["html"], sweep["md"]
    problems = page.split('<div class="problems">1 of 2 runs did not finish ok')[1].split("</div>")[0]
    assert DIVERGING in problems and "diverged" in problems and "non-finite" in problems
    assert not [r for r in _chart_rows(page) if r.get("privacy") == DIVERGING]
    (row,) = [cells for cells in _runs_table(page) if cells[3] == DIVERGING]
    assert "diverged" in row[5] and row[6] == "0/2" and row[7] == "—"  # no accuracy, not even a partial one
    header = next(line for line in md.splitlines() if line.startswith("| backend:variant | non-private acc"))
    assert f"| {DIVERGING} acc |" in header
    table_row = md.splitlines()[md.splitlines().index(header) + 2]
    column = header.split(" | ").index(f"{DIVERGING} acc")
    assert table_row.split(" | ")[column] == "—"
    assert f"jax:bk {DIVERGING} seed 0: **diverged** Diverged: non-finite" in md


def test_shuffle_sampled_dp_runs_carry_the_note_and_every_epsilon_is_marked(sweep):
    rows, page, md = sweep["rows"], sweep["html"], sweep["md"]
    shuffled = rows[rows["sampling"] == "shuffle"]
    dp = shuffled[shuffled["dp"].astype(bool)]
    assert len(dp) == 2 and set(dp["accounting_note"]) == {SHUFFLE_NOTE} and dp["epsilon"].notna().all()
    assert set(rows[rows["sampling"] == "poisson"]["accounting_note"]) == {""}
    for cells in _runs_table(page):
        if cells[1] == "shuffled" and cells[3] != "non-private":
            assert cells[3] == "σ=1 †"
            assert all(cell.endswith("†</span>") for cell in cells[8:10]), cells  # ε (PLD), ε (RDP)
        else:
            assert "†" not in "".join(cells[8:11])
    marks = {r["privacy"]: r["sampling_mark"] for r in _chart_rows(page) if "sampling_mark" in r}
    assert marks["σ=1 †"] == "ε assumes Poisson" and marks["σ=1"] == "Poisson"
    assert "not a proven guarantee" in page
    section = md.split("## numbers / shuffled")[1]
    assert "shuffle-sampled DP runs (†)" in section
    assert re.search(r"Final σ=1 †: ε \d+\.\d+† \(PLD\), \d+\.\d+† \(RDP\)\.", section), section
    poisson = md.split("## numbers / poisson")[1].split("## numbers / shuffled")[0]
    assert "†" not in poisson


# --------------------------------------------------------------------------- in-process: runner and worker


FAKE_WORKER = """
import json, os, sys, time

job = json.load(open(sys.argv[-1]))
kind = "round" if job["run"].get("federated") else "epoch"


def emit(event, **fields):
    with open(job["events"], "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\\n")


emit("start", pid=os.getpid(), python="3.11")
emit("built", seconds=0.1, versions={})
fields = dict(examples=100, train_loss=0.5, train_accuracy=0.9, test_loss=0.5, test_accuracy=0.9, train_seconds=0.1,
              peak_memory_mb=10.0)
if kind == "epoch":
    emit("epoch", epoch=1, steps=4, epoch_seconds=0.1, physical_batch_size=64, compilations=1, epsilon_reported=None,
         **fields)
else:
    emit("round", round=1, sampled_clients=3, clip_norm=0.1, unclipped_fraction=0.5, round_seconds=0.1, **fields)
emit("end", status="ok", error="")  # ok, after one of the planned epochs (rounds)
"""


def _small_run(**changes) -> RunSpec:
    """conftest's small run with DP and three epochs."""
    return small_run(
        **{
            "suite": "short",
            "train": TrainConfig(epochs=3, batch_size=50),
            "dp": DPConfig(noise_multiplier=1.0),
            "variant": "vmap",
            **changes,
        }
    )


def _fed_run(**dp) -> RunSpec:
    fed = FederatedConfig(
        partition=PartitionSpec(kind="dirichlet", clients=20), rounds=3, clients_per_round=5, total_clients=20
    )
    return _small_run(
        federated=fed, train=TrainConfig(epochs=1, batch_size=4), dp=DPConfig(**(dp or {"noise_multiplier": 0.5}))
    )


@pytest.mark.parametrize("federated", [False, True], ids=["epochs", "rounds"])
def test_a_worker_that_says_ok_short_of_its_plan_is_failed(tmp_path, monkeypatch, federated):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    python = tmp_path / "fake-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runner = Runner(tmp_path / "results", env="current", log=lambda msg: None)
    monkeypatch.setattr(runner, "python_for", lambda backend: str(python))
    run = _fed_run() if federated else _small_run()
    outcome = runner.execute(run, timeout=60)
    unit = "rounds" if federated else "epochs"
    assert outcome.status == "failed" and f"worker reported ok after 1 of 3 {unit}" in outcome.error
    path = result_path(tmp_path / "results", run.suite, run.run_id)
    assert read_status(path) == "failed"
    report = make_report(tmp_path / "results")
    page, md = render(report, "html"), render(report, "md")
    assert "1 of 1 runs did not finish ok" in page and "worker reported ok after 1 of 3" in page
    (row,) = _runs_table(page)
    assert "failed" in row[5] and row[7] == "—"  # not the accuracy of the one epoch (round) it did
    assert "**failed** worker reported ok after 1 of 3" in md
    assert "No run in this workload finished ok, so there is nothing to chart." in page and not _chart_rows(page)


class _FakeBackend:
    """A backend whose loss or logits go non-finite at a given step, to drive the real worker's loop."""

    name = "fake"
    variants = ("x",)

    def __init__(self, *, bad_loss_at: int | None = None, nan_logits: bool = False):
        self.bad_loss_at, self.nan_logits, self.steps = bad_loss_at, nan_logits, 0

    def versions(self):
        return {}

    def build(self, run, model, init_params, *, physical_batch_size):
        self.classes = model.num_classes

    def train_step(self, x, y, mask):
        self.steps += 1
        loss = math.inf if self.steps == self.bad_loss_at else 1.0
        return StepStats(loss=loss, accuracy=0.5, examples=int(mask.sum()))

    def predict(self, x):
        logits = np.zeros((len(x), self.classes))
        return logits * np.nan if self.nan_logits else logits

    def reported_epsilon(self, delta):
        return None

    def peak_memory_mb(self):
        return None

    def compilations(self):
        return 1


@pytest.mark.parametrize(
    ("faults", "status", "epochs_with_rows"),
    [
        ({"bad_loss_at": 6}, "diverged", 1),  # step 6: in the second epoch (4 steps per epoch)
        ({"nan_logits": True}, "diverged", 0),  # training fine, evaluation NaN
        ({}, "ok", 3),
    ],
    ids=["inf-training-loss", "nan-logits", "finite"],
)
def test_the_worker_stops_at_the_first_non_finite_loss(tmp_path, monkeypatch, faults, status, epochs_with_rows):
    backend = _FakeBackend(**faults)
    run = _small_run()
    rng = np.random.default_rng(0)
    data = Dataset(
        rng.standard_normal((200, 4, 4, 1)).astype(np.float32),
        rng.integers(0, 3, 200),
        rng.standard_normal((40, 4, 4, 1)).astype(np.float32),
        rng.integers(0, 3, 40),
        3,
    )
    monkeypatch.setattr(worker, "create_backend", lambda name: backend)
    monkeypatch.setattr(worker, "load_prepared", lambda path: data)
    monkeypatch.setattr(worker, "pin_threads", lambda threads: None)
    job = tmp_path / "job.json"
    events_path = tmp_path / "events.jsonl"
    job.write_text(json.dumps({"run": run.to_dict(), "data": "unused", "events": str(events_path)}))
    assert worker.main([str(job)]) == 0  # diverged is a result about the workload, not a crash
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    final, error = _finish_status(run, events, 0, False)
    assert final == status and (status == "ok" or "non-finite" in error)
    rows = build_rows(run, events, final, error, 0.0)
    finished = [r for r in rows if r.get("test_accuracy") is not None]
    assert len(finished) == epochs_with_rows
    assert all(math.isfinite(r["test_accuracy"]) and math.isfinite(r["train_loss"]) for r in finished)


# --------------------------------------------------------------------------- federated: Poisson client sampling only


def test_federated_rows_carry_user_level_epsilon_of_poisson_client_sampling():
    run = _fed_run(noise_multiplier=0.5)
    events = [
        {"event": "round", "round": r, "examples": 50, "train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.0,
         "test_accuracy": 0.5, "sampled_clients": 5, "clip_norm": 0.1, "unclipped_fraction": 0.5,
         "train_seconds": 0.1, "round_seconds": 0.2, "peak_memory_mb": 1.0}
        for r in (1, 2, 3)
    ]  # fmt: skip
    rows = build_rows(run, [*events, {"event": "end", "status": "ok"}], "ok", "", 0.0)
    assert {r["workload_kind"] for r in rows} == {"federated"} and {r["sampling"] for r in rows} == {"poisson"}
    assert {r["accounting_note"] for r in rows} == {""} and {r["sample_rate"] for r in rows} == {5 / 20}
    expected = accounting.epsilon_curve(sample_rate=5 / 20, noise_multiplier=0.5, steps=[1, 2, 3], delta=1e-5)
    assert [r["epsilon"] for r in rows] == pytest.approx([e.pld for e in expected])
    assert [r["epsilon_rdp"] for r in rows] == pytest.approx([e.rdp for e in expected])
    frame = pd.DataFrame(rows)
    assert tables.privacy_level(tables.runs(frame).iloc[0]) == "σ=0.5 · 5/round"  # nothing to mark


def test_a_federated_run_cannot_be_given_shuffle_sampling(tmp_path):
    with pytest.raises(SpecError, match="poisson for a federated run"):
        _fed_run(noise_multiplier=0.5, sampling="shuffle")
    fed = {
        "name": "fed",
        "workloads": [
            {
                "name": "fedavg",
                "dataset": copy.deepcopy(DATA),
                "model": "mlp",
                "train": {"epochs": 1, "batch_size": 4},
                "federated": {"partition": {"kind": "dirichlet", "clients": 20}, "rounds": 3, "clients_per_round": 5},
                "dp": {"max_grad_norm": 0.1, "sampling": "shuffle"},
                "privacy": [{"noise_multiplier": 0.1}],
            }
        ],
    }
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(fed))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.path == "workloads[0].dp.sampling" and "poisson (client sampling)" in str(info.value)
    fed["workloads"][0]["dp"]["sampling"] = "poisson"
    path.write_text(yaml.safe_dump(fed))
    assert all(r.dp.sampling == "poisson" for r in load_suite(path).runs)
