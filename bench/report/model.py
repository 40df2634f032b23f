"""Everything a report shows, computed once from the results and shared by the HTML and Markdown writers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd

from bench.report import tables
from bench.resultset import ResultSet


@dataclass(frozen=True, kw_only=True)
class Section:
    """One suite's workload: the runs in it share data, model and training settings."""

    suite: str
    workload: str
    runs: pd.DataFrame
    privacy_accuracy: pd.DataFrame
    speed: pd.DataFrame
    memory: pd.DataFrame
    learning_curves: pd.DataFrame
    epsilon_curves: pd.DataFrame
    privacy_order: list[str]
    kind: str = "centralized"
    federated_runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    round_accuracy: pd.DataFrame = field(default_factory=pd.DataFrame)
    clip_curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    audits: pd.DataFrame = field(default_factory=pd.DataFrame)  # bench audit's records of this workload

    @property
    def federated(self) -> bool:
        """Whether this workload's runs are DP-FedAvg rounds rather than DP-SGD epochs."""
        return self.kind == tables.FEDERATED

    @property
    def title(self) -> str:
        first = self.runs.iloc[0]
        return f"{self.suite} / {self.workload}: {first['dataset']} × {first['model']}"

    @property
    def shuffled(self) -> bool:
        return bool(((self.runs["sampling"] == "shuffle") & self.runs["dp"].astype(bool)).any())

    def settings(self) -> str:
        """The workload's shared settings in one line (the values of its first run; DP ones from a DP run)."""
        if self.federated:
            return federated_settings(self.runs)
        first = self.runs.iloc[0]
        dp = self.runs[self.runs["dp"].astype(bool)]
        parts = [
            f"{int(first['dataset_size'])} training examples" if pd.notna(first["dataset_size"]) else None,
            f"{int(first['epochs'])} epochs" if pd.notna(first["epochs"]) else None,
            f"expected batch {int(first['batch_size'])}" if pd.notna(first["batch_size"]) else None,
            f"{first['optimizer']}" if isinstance(first["optimizer"], str) else None,
        ]
        if not dp.empty:
            d = dp.iloc[0]
            if pd.notna(d["max_grad_norm"]) and pd.notna(d["delta"]):
                parts += [f"clipping norm C={d['max_grad_norm']:g}", f"δ={d['delta']:g}"]
            parts.append(f"{d['sampling']} sampling")
        return ", ".join(p for p in parts if p)


def _count(value: object, unit: str) -> str | None:
    """'100 rounds', '1 local epoch'; None when the value is missing."""
    if value is None or pd.isna(value):
        return None
    n = int(value)  # type: ignore[arg-type]
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def clients_per_round(runs: pd.DataFrame) -> str | None:
    """'expected 50 clients per round', or 'expected 50–120 clients per round' when the runs differ."""
    values = sorted({int(v) for v in runs["clients_per_round"].dropna()})
    if not values:
        return None
    span = str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"
    return f"expected {span} clients per round"


def federated_settings(runs: pd.DataFrame) -> str:
    """A federated workload's shared settings in one line: clients, rounds, local training, clip, δ, sampling."""
    first = runs.iloc[0]
    dp = runs[runs["dp"].astype(bool)]
    parts = [
        f"{int(first['dataset_size'])} training examples" if pd.notna(first["dataset_size"]) else None,
        _count(first["total_clients"], "client"),
        clients_per_round(runs),
        _count(first["rounds"], "round"),
        _count(first["epochs"], "local epoch"),
        f"client batch {int(first['batch_size'])}" if pd.notna(first["batch_size"]) else None,
        f"client {first['optimizer']}" if isinstance(first["optimizer"], str) else None,
    ]
    if dp.empty:
        return ", ".join(p for p in [*parts, "Poisson sampling of clients"] if p)
    d = dp.iloc[0]
    parts += [
        f"initial clip C={d['max_grad_norm']:g}" if pd.notna(d["max_grad_norm"]) else None,
        f"δ={d['delta']:g}" if pd.notna(d["delta"]) else None,
        "Poisson sampling of clients (user-level DP)",
    ]
    return ", ".join(p for p in parts if p)


@dataclass(frozen=True, kw_only=True)
class Report:
    results: ResultSet
    runs: pd.DataFrame
    sections: list[Section]
    labels: list[str]
    provenance: pd.DataFrame
    generated_at: datetime

    @property
    def suites(self) -> list[str]:
        return sorted({s.suite for s in self.sections})

    @property
    def status_counts(self) -> dict[str, int]:
        return tables.status_counts(self.runs)


def _federated_tables(rows: pd.DataFrame, run_table: pd.DataFrame) -> dict[str, object]:
    """The Section fields that only a federated workload has."""
    return {
        "kind": tables.FEDERATED,
        "privacy_accuracy": tables.federated_privacy_accuracy(run_table),
        "federated_runs": tables.federated_runs(rows, run_table),
        "round_accuracy": tables.round_accuracy(rows, run_table),
        "clip_curves": tables.clip_curves(rows, run_table),
    }


def _audits_of(audits: pd.DataFrame, suite: str, workload: str) -> pd.DataFrame:
    if audits.empty:
        return audits
    return audits[(audits["suite"] == suite) & (audits["workload"] == workload)].reset_index(drop=True)


def build(results: ResultSet, audits: pd.DataFrame | None = None) -> Report:
    """The report's tables; `audits` (bench.audit.records.read_audits) adds each workload's measured privacy."""
    audits = pd.DataFrame() if audits is None else audits
    rows = results.frame
    run_table = tables.runs(rows)
    sections = []
    for suite, workload in tables.sections(run_table):
        in_section = (run_table["suite"].astype(str) == suite) & (run_table["workload"].astype(str) == workload)
        section_runs = run_table[in_section].reset_index(drop=True)
        section_rows = rows[rows["run_id"].isin(section_runs["run_id"])]
        order = list(dict.fromkeys(section_runs.sort_values("privacy_order", kind="stable")["privacy"]))
        if tables.federated_mask(section_runs).any():
            fields = _federated_tables(section_rows, section_runs)
        else:
            fields = {"privacy_accuracy": tables.privacy_accuracy(section_runs)}
        sections.append(
            Section(
                suite=suite,
                workload=workload,
                runs=section_runs,
                speed=tables.speed(section_rows, section_runs),
                memory=tables.memory(section_runs),
                learning_curves=tables.learning_curves(section_rows, section_runs),
                epsilon_curves=tables.epsilon_curves(section_rows, section_runs),
                privacy_order=order,
                audits=_audits_of(audits, suite, workload),
                **fields,
            )
        )
    return Report(
        results=results,
        runs=run_table,
        sections=sections,
        labels=sorted(run_table["label"].unique()) if not run_table.empty else [],
        provenance=tables.provenance(run_table),
        generated_at=datetime.now(UTC),
    )
