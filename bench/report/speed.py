"""`bench speed`: what DP costs per backend/variant, as the README's Markdown table, and a check of speed targets.

Pure pandas over the per-epoch result rows. Numbers use the report's definitions (`tables.speed`,
`tables.memory`): seconds per epoch is the median over epochs after the first, pooled over a label's DP runs or
its non-private runs; peak memory is a run's largest `peak_memory_mb`, median over runs. Only ok runs count, and
a ratio whose other half has no ok run is NaN, never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.report import tables
from bench.report.markdown import escape

SPEED_SUITE = "speed"

# One row per (suite, workload, label); every column always present, NaN where it cannot be computed.
COLUMNS = [
    *tables.SECTION,
    "label",
    "backend",
    "dp_seconds",
    "np_seconds",
    "dp_overhead",
    "dp_vs_fastest_dp",
    "dp_vs_fastest_np",
    "dp_peak_mb",
    "np_peak_mb",
    "memory_ratio",
    "core_share",
]
FAILED_COLUMNS = ["label", "privacy", "status", "reason"]

MET, MISSED, NA = "met", "missed", "n/a"


@dataclass(frozen=True)
class Target:
    """A limit on one measured value of the checked label; `strict` means the value must stay below it."""

    name: str
    description: str
    limit: float
    strict: bool = False
    percent: bool = False  # shown as a percentage (a share), not as a ratio

    def status(self, measured: float) -> str:
        """'met', 'missed', or 'n/a' when the value could not be measured."""
        if math.isnan(measured):
            return NA
        ok = measured < self.limit if self.strict else measured <= self.limit
        return MET if ok else MISSED


TARGETS: tuple[Target, ...] = (
    Target("dp_overhead", "DP / non-private seconds per epoch, same backend/variant", 1.2),
    Target(
        "dp_vs_fastest_other_dp",
        "DP / the fastest DP of any other backend (other than the checked one's backend)",
        1.0,
    ),
    Target("dp_vs_fastest_np", "DP / the fastest non-private of any backend/variant", 1.5),
    Target("memory_ratio", "DP / non-private peak memory, same backend/variant", 1.5),
    Target("core_share", "the core's own per-step work as a share of the epoch", 0.05, strict=True, percent=True),
)


@dataclass(frozen=True)
class TargetResult:
    target: Target
    measured: float  # NaN when it cannot be computed
    status: str  # MET, MISSED or NA

    @property
    def passed(self) -> bool:
        return self.status == MET


@dataclass(frozen=True, kw_only=True)
class SpeedSection:
    """One suite's workload: the table (COLUMNS, sorted by DP seconds), the runs that did not end ok, the targets."""

    suite: str
    workload: str
    settings: str
    table: pd.DataFrame
    failed: pd.DataFrame
    label: str
    targets: tuple[TargetResult, ...]


@dataclass(frozen=True, kw_only=True)
class SpeedReport:
    label: str
    sections: tuple[SpeedSection, ...]

    @property
    def passed(self) -> bool:
        """Every target of the checked label met in every section (n/a counts as not met)."""
        return bool(self.sections) and all(r.passed for s in self.sections for r in s.targets)


def default_label() -> str:
    """The label the targets are for unless asked otherwise: the jax backend's default variant."""
    from bench.backend import get_backend_info

    return f"jax:{get_backend_info('jax').default_variant}"


def labels(rows: pd.DataFrame) -> list[str]:
    """Every backend:variant with a row in `rows`, whatever its status."""
    return sorted({tables.label(b, v) for b, v in zip(rows["backend"], rows["variant"], strict=True)})


def pick_suite(rows: pd.DataFrame, suite: str | None) -> pd.DataFrame:
    """The rows of `suite`; without one, the speed suite's if the results have it, else all of them."""
    name = suite if suite is not None else (SPEED_SUITE if (rows["suite"] == SPEED_SUITE).any() else None)
    return rows if name is None else rows[rows["suite"] == name].reset_index(drop=True)


def core_share(rows: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """Per label: median over the timed epochs of its ok runs of (epoch_seconds - train_seconds) / epoch_seconds.

    `train_seconds` is the backend's steps only, so the rest of the epoch is the core's sampling, gathering,
    augmentation and padding: the part every backend pays alike.
    """
    ok = run_table[run_table["status"] == "ok"] if not run_table.empty else run_table
    out = []
    for (suite, workload, lab), g in ok.groupby([*tables.SECTION, "label"], sort=False):
        shares = pd.concat([_epoch_shares(rows[rows["run_id"] == r]) for r in g["run_id"]])
        median = float(shares.median()) if not shares.empty else np.nan
        out.append({"suite": suite, "workload": workload, "label": lab, "core_share": median})
    return pd.DataFrame(out, columns=[*tables.SECTION, "label", "core_share"])


def _epoch_shares(run_rows: pd.DataFrame) -> pd.Series:
    timed = tables.timed_epochs(run_rows)
    timed = timed[timed > 0]
    train = run_rows.loc[timed.index, "train_seconds"]
    return ((timed - train) / timed).dropna()


def speed_table(rows: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """One row per section and label (every label with a run, ok or not) with the COLUMNS; ratios within a section."""
    if run_table.empty:
        return pd.DataFrame(columns=COLUMNS)
    base = run_table[[*tables.SECTION, "label", "backend"]].drop_duplicates([*tables.SECTION, "label"])
    seconds = _wide(tables.speed(rows, run_table), "seconds", "dp_seconds", "np_seconds")
    peaks = _wide(tables.memory(run_table), "peak_memory_mb", "dp_peak_mb", "np_peak_mb")
    keys = [*tables.SECTION, "label"]
    table = base.merge(seconds, on=keys, how="left").merge(peaks, on=keys, how="left")
    table = table.merge(core_share(rows, run_table), on=keys, how="left")
    fastest_dp = table.groupby(tables.SECTION)["dp_seconds"].transform("min")
    fastest_np = table.groupby(tables.SECTION)["np_seconds"].transform("min")
    table = table.assign(
        dp_overhead=table["dp_seconds"] / table["np_seconds"],
        dp_vs_fastest_dp=table["dp_seconds"] / fastest_dp,
        dp_vs_fastest_np=table["dp_seconds"] / fastest_np,
        memory_ratio=table["dp_peak_mb"] / table["np_peak_mb"],
    )
    table = table.sort_values([*tables.SECTION, "dp_seconds", "label"], na_position="last", key=_sort_key)
    return table[COLUMNS].reset_index(drop=True)


def _sort_key(col: pd.Series) -> pd.Series:
    return col.astype(str) if col.name in (*tables.SECTION, "label") else col


def _wide(per_mode: pd.DataFrame, value: str, dp_name: str, np_name: str) -> pd.DataFrame:
    """tables.speed/memory (one row per label and mode) -> one row per label with a DP and a non-private column."""
    keys = [*tables.SECTION, "label"]
    out = pd.DataFrame(columns=[*keys, dp_name, np_name])
    if per_mode.empty:
        return out.astype({dp_name: float, np_name: float})
    wide = per_mode.pivot_table(index=keys, columns="mode", values=value, aggfunc="first")
    wide = wide.reindex(columns=[tables.DP, tables.NONDP])
    return wide.rename(columns={tables.DP: dp_name, tables.NONDP: np_name}).reset_index().rename_axis(columns=None)


def measure(section: pd.DataFrame, label: str) -> dict[str, float]:
    """The checked label's values for each target, from one section's table; NaN where it cannot be computed."""
    names = [t.name for t in TARGETS]
    row = section[section["label"] == label]
    if row.empty:
        return dict.fromkeys(names, math.nan)
    r = row.iloc[0]
    others = section[section["backend"] != r["backend"]]["dp_seconds"].dropna()
    fastest_other = float(others.min()) if not others.empty else math.nan
    values = {
        "dp_overhead": r["dp_overhead"],
        "dp_vs_fastest_other_dp": r["dp_seconds"] / fastest_other,
        "dp_vs_fastest_np": r["dp_vs_fastest_np"],
        "memory_ratio": r["memory_ratio"],
        "core_share": r["core_share"],
    }
    return {k: float(v) for k, v in values.items()}


def check(section: pd.DataFrame, label: str, targets: tuple[Target, ...] = TARGETS) -> tuple[TargetResult, ...]:
    """Each target judged on the label's values in one section's table."""
    values = measure(section, label)
    results = []
    for t in targets:
        value = values.get(t.name, math.nan)
        results.append(TargetResult(target=t, measured=value, status=t.status(value)))
    return tuple(results)


REASON_CHARS = 200  # a framework's first error line can be kilobytes (XLA prints whole HLO instructions)


def _reason(error: str | None) -> str:
    line = (error or "").strip().split("\n")[0]
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 1] + "…"


def failed_runs(section_runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that did not end ok, with the first line of their error (cut to REASON_CHARS) as the reason."""
    bad = section_runs[section_runs["status"] != "ok"]
    out = bad[["label", "privacy", "status"]].assign(reason=[_reason(e) for e in bad["error"]])
    return out[FAILED_COLUMNS].reset_index(drop=True)


def settings(section_runs: pd.DataFrame) -> str:
    """Dataset, model, batch size and epochs of a section's ok runs (or all, if none is ok); '/' joins differences.

    A run that failed before its first epoch may carry placeholders, so ok runs speak for the workload.
    """
    ok = section_runs[section_runs["status"] == "ok"]
    section_runs = ok if not ok.empty else section_runs
    parts = [
        ("dataset", "dataset {}"),
        ("model", "model {}"),
        ("batch_size", "expected batch {}"),
        ("epochs", "{} epochs"),
    ]
    return ", ".join(text.format(_values(section_runs[col])) for col, text in parts if section_runs[col].notna().any())


def _values(col: pd.Series) -> str:
    def show(v: object) -> str:
        return str(int(v)) if isinstance(v, float | np.floating) and float(v).is_integer() else str(v)

    return "/".join(dict.fromkeys(show(v) for v in col.dropna()))


def build(rows: pd.DataFrame, label: str, targets: tuple[Target, ...] = TARGETS) -> SpeedReport:
    """The speed tables of every DP-SGD section in `rows`, with `label`'s targets checked in each (federated
    workloads have rounds, not epochs of DP-SGD steps: the report's own table shows their seconds per round)."""
    if "workload_kind" in rows:
        rows = rows[rows["workload_kind"].fillna("centralized") != "federated"]
    run_table = tables.runs(rows)
    table = speed_table(rows, run_table)
    sections = []
    for suite, workload in tables.sections(run_table):
        runs_in = run_table[(run_table["suite"].astype(str) == suite) & (run_table["workload"].astype(str) == workload)]
        section = table[(table["suite"].astype(str) == suite) & (table["workload"].astype(str) == workload)]
        section = section.reset_index(drop=True)
        sections.append(
            SpeedSection(
                suite=suite,
                workload=workload,
                settings=settings(runs_in),
                table=section,
                failed=failed_runs(runs_in),
                label=label,
                targets=check(section, label, targets),
            )
        )
    return SpeedReport(label=label, sections=tuple(sections))


# --- Markdown ----------------------------------------------------------------------------------------------------

HEADERS = [
    "backend:variant",
    "DP s/epoch",
    "non-private s/epoch",
    "DP / non-private",
    "DP / fastest DP",
    "DP / fastest non-private",
    "DP peak MB",
    "non-private peak MB",
    "DP / non-private memory",
    "core share",
]
DEFINITIONS = (
    "Seconds per epoch: median over the epochs after the first (which compiles), pooled over seeds and, for DP, "
    "privacy levels; only runs that ended ok. Peak memory: the worker's peak RSS on CPU or the device peak on GPU, "
    "largest over a run's epochs, median over runs. Core share: (`epoch_seconds` - `train_seconds`) / "
    "`epoch_seconds`, median over the timed epochs of all ok runs. —: no ok run to compute it from."
)


def _finite(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def fmt_seconds(value: object) -> str:
    """Three significant digits, trailing zeros kept: 1.00, 0.0500, 12.3, 1230."""
    x = _finite(value)
    if x is None:
        return "—"
    rounded = float(f"{x:.3g}")
    if rounded == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{decimals}f}"


def fmt_ratio(value: object) -> str:
    x = _finite(value)
    return "—" if x is None else f"{x:.2f}×"


def fmt_mb(value: object) -> str:
    x = _finite(value)
    return "—" if x is None else f"{x:.0f}"


def fmt_share(value: object) -> str:
    x = _finite(value)
    return "—" if x is None else f"{100 * x:.1f}%"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table_lines(table: pd.DataFrame) -> list[str]:
    lines = [_row(HEADERS), _row(["---"] * len(HEADERS))]
    for _, r in table.iterrows():
        lines.append(
            _row(
                [
                    escape(r["label"]),
                    fmt_seconds(r["dp_seconds"]),
                    fmt_seconds(r["np_seconds"]),
                    fmt_ratio(r["dp_overhead"]),
                    fmt_ratio(r["dp_vs_fastest_dp"]),
                    fmt_ratio(r["dp_vs_fastest_np"]),
                    fmt_mb(r["dp_peak_mb"]),
                    fmt_mb(r["np_peak_mb"]),
                    fmt_ratio(r["memory_ratio"]),
                    fmt_share(r["core_share"]),
                ]
            )
        )
    return lines


def _target_lines(label: str, results: tuple[TargetResult, ...]) -> list[str]:
    lines = [f"Targets for {escape(label)}:", "", _row(["target", "limit", "measured", ""]), _row(["---"] * 4)]
    for r in results:
        t = r.target
        show = fmt_share if t.percent else fmt_ratio
        limit = ("< " if t.strict else "≤ ") + show(t.limit)
        lines.append(_row([f"{escape(t.name)}: {escape(t.description)}", limit, show(r.measured), r.status]))
    return lines


def _section_lines(section: SpeedSection) -> list[str]:
    lines = [f"### {escape(section.suite)} / {escape(section.workload)}", "", escape(section.settings), ""]
    lines += [*_table_lines(section.table), ""]
    if not section.failed.empty:
        lines.append("Runs that did not end ok:")
        for _, r in section.failed.iterrows():
            line = f"- {escape(r['label'])} {escape(r['privacy'])}: **{escape(r['status'])}** {escape(r['reason'])}"
            lines.append(line.rstrip())
        lines.append("")
    return [*lines, *_target_lines(section.label, section.targets), ""]


def render_speed(report: SpeedReport) -> str:
    """Markdown: per section a heading, its settings, the table, the runs that failed and the targets."""
    lines = [line for section in report.sections for line in _section_lines(section)]
    return "\n".join([*lines, DEFINITIONS]) + "\n"
