"""`bench compare`: did a change make DP training slower, less accurate or less private?

Runs are matched by what determines their numbers (the spec without suite name, run id, seed and performance
settings; a target epsilon rather than the noise calibrated from it), so a re-run on another machine, under
another suite name or after an accountant change still meets its baseline. Verdicts follow asv: a change counts
only when it exceeds its threshold *and* the spread over epochs or seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from bench.report import tables
from bench.resultset import ResultsError, ResultSet

BENCHMARKS_DIR = "_benchmarks"
EXIT_OK, EXIT_REGRESSION, EXIT_UNUSABLE = 0, 1, 2


class Verdict(StrEnum):
    OK = "ok"
    REGRESSION = "regression"
    IMPROVED = "improved"
    MISSING = "missing"  # in the baseline, not in the current results: fails, the gate cannot vouch for it
    NEW = "new"  # only in the current results: reported, does not fail
    INFO = "info"  # shown for reading, never judged (micro-benchmarks, absolute times across machines)


FAILING = (Verdict.REGRESSION, Verdict.MISSING)

Metric = Literal[
    "status",
    "epsilon",
    "noise_multiplier",
    "accuracy",
    "dp_overhead",
    "dp_seconds",
    "non_private_seconds",
    "dp_peak_memory_mb",
    "non_private_peak_memory_mb",
    "benchmark",
]


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """When a difference is a regression. Slowdown and memory growth are relative, accuracy drop absolute.

    `absolute=False` judges speed by the DP overhead ratio only: absolute seconds and memory are shown, not
    judged, even on the same hardware (for gates on shared machines, where other load skews them).
    """

    max_slowdown: float = 0.15
    max_accuracy_drop: float = 0.01
    max_memory_growth: float = 0.25
    epsilon_rtol: float = 1e-6
    absolute: bool = True

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "absolute":
                if not isinstance(value, bool):
                    raise ValueError(f"absolute: got {value!r}, expected true or false")
            elif not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}: got {value!r}, expected a finite number >= 0")


@dataclass(frozen=True, kw_only=True)
class Check:
    """One judged quantity of one workload, backend/variant and privacy level (or mode)."""

    suite: str
    workload: str
    label: str
    privacy: str
    metric: Metric
    baseline: float | str | None
    current: float | str | None
    verdict: Verdict
    detail: str = ""

    @property
    def change(self) -> float | None:
        if isinstance(self.baseline, int | float) and isinstance(self.current, int | float) and self.baseline:
            return self.current / self.baseline - 1
        return None


@dataclass(frozen=True, kw_only=True)
class Comparison:
    checks: list[Check]
    baseline_hardware: list[str]
    current_hardware: list[str]
    skipped_files: list[str] = field(default_factory=list)

    @property
    def same_hardware(self) -> bool:
        return bool(self.baseline_hardware) and self.baseline_hardware == self.current_hardware

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.checks:
            out[c.verdict.value] = out.get(c.verdict.value, 0) + 1
        return out

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.verdict in FAILING]

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.failed else EXIT_OK


# --- matching ---------------------------------------------------------------------------------------------------


def config_key(spec_json: str) -> str:
    """What determines a run's numbers, seed excluded: runs with equal keys are seeds of one configuration."""
    spec = json.loads(spec_json)
    for name in ("suite", "workload", "perf", "seed"):
        spec.pop(name, None)
    for optional in ("federated", "audit"):
        if spec.get(optional, None) is None:
            spec.pop(optional, None)  # older specs predate the field: a run without it matches with or without it
    dp = spec.get("dp", {})
    if dp.get("enabled") and dp.get("target_epsilon") is not None:
        dp.pop("noise_multiplier", None)  # calibrated from the target: a change in it is a finding, not a new run
    else:
        dp.pop("target_epsilon", None)
    return json.dumps(spec, sort_keys=True)


def section_key(spec_json: str) -> str:
    """What a backend's DP and non-private runs share, so that their ratio is the DP overhead."""
    spec = json.loads(spec_json)
    train = {k: v for k, v in spec.get("train", {}).items() if k != "optimizer"}
    keep = {k: spec.get(k) for k in ("dataset", "dataset_size", "model", "backend", "variant")}
    return json.dumps({**keep, "train": train}, sort_keys=True)


def _keys(spec: object) -> tuple[str, str] | None:
    """(config key, section key) of a run's spec column; None when there is no readable spec to match on."""
    if not isinstance(spec, str):
        return None
    try:
        return config_key(spec), section_key(spec)
    except (ValueError, TypeError, AttributeError):
        return None


def _keyed(results: ResultSet) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Rows, the run table with match keys, and a note for every run that cannot be matched (left out)."""
    rows = results.frame
    run_table = tables.runs(rows)
    if run_table.empty:
        return rows, run_table, []
    keys = run_table["spec"].map(_keys)
    unmatched = [
        f"{results.source}: run {run_id}: no readable spec column, so it cannot be matched"
        for run_id in run_table[keys.isna()]["run_id"]
    ]
    run_table, keys = run_table[keys.notna()], keys[keys.notna()]
    run_table = run_table.assign(config=[k[0] for k in keys], section=[k[1] for k in keys])
    return rows, run_table, unmatched


# --- judging ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    """A median with the range it came from."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> _Sample | None:
        s = pd.Series(list(values), dtype=float).dropna()
        return cls(float(s.median()), float(s.min()), float(s.max())) if not s.empty else None


def _judge_growth(base: _Sample, cur: _Sample, threshold: float) -> tuple[Verdict, str]:
    """Larger is worse. A regression must exceed the threshold and lie outside the baseline's range (as asv)."""
    change = cur.median / base.median - 1 if base.median else math.inf
    text = f"{change:+.1%} (baseline {base.low:.4g}-{base.high:.4g}, current {cur.low:.4g}-{cur.high:.4g})"
    if change > threshold and cur.low > base.high:
        return Verdict.REGRESSION, text
    if change < -threshold and cur.high < base.low:
        return Verdict.IMPROVED, text
    if abs(change) > threshold:
        return Verdict.OK, text + ": within the spread"
    return Verdict.OK, text


def _check(
    ident: dict[str, str], metric: Metric, baseline: object, current: object, verdict: Verdict, detail: str = ""
) -> Check:
    return Check(**ident, metric=metric, baseline=baseline, current=current, verdict=verdict, detail=detail)


def _status_checks(base: pd.DataFrame, cur: pd.DataFrame, ident: dict[str, str]) -> list[Check]:
    checks = []
    cur_by_seed = cur.set_index("seed")
    for _, b in base.iterrows():
        seed = b["seed"]
        if seed not in cur_by_seed.index:
            checks.append(_check(ident, "status", b["status"], None, Verdict.MISSING, f"seed {seed}: no current run"))
            continue
        c = cur_by_seed.loc[seed]
        if b["status"] == "ok" and c["status"] != "ok":
            reason = (c["error"] or "").strip().split("\n")[0]
            verdict, detail = Verdict.REGRESSION, f"seed {seed}: was ok, now {c['status']}: {reason}"
        elif b["status"] != "ok" and c["status"] == "ok":
            verdict, detail = Verdict.IMPROVED, f"seed {seed}: was {b['status']}, now ok"
        else:
            verdict, detail = Verdict.OK, f"seed {seed}"
        checks.append(_check(ident, "status", b["status"], c["status"], verdict, detail))
    for seed in sorted(set(cur["seed"]) - set(base["seed"])):
        status = cur_by_seed.loc[seed, "status"]
        checks.append(_check(ident, "status", None, status, Verdict.NEW, f"seed {seed}: not in the baseline"))
    return checks


def _privacy_checks(base: pd.DataFrame, cur: pd.DataFrame, ident: dict[str, str], t: Thresholds) -> list[Check]:
    """Epsilon and the calibrated noise must not move at all; accuracy must not drop beyond the threshold and the
    baseline's standard deviation over the seeds both sides ran."""
    checks = []
    b_ok, c_ok = base[base["status"] == "ok"], cur[cur["status"] == "ok"]
    if bool(base["dp"].iloc[0]) and not b_ok.empty and not c_ok.empty:
        for metric in ("epsilon", "noise_multiplier"):
            bv, cv = float(b_ok[metric].mean()), float(c_ok[metric].mean())
            same = math.isclose(bv, cv, rel_tol=t.epsilon_rtol, abs_tol=0.0)
            detail = "" if same else f"changed by {cv - bv:+.6g} for identical settings: an accounting change"
            checks.append(_check(ident, metric, bv, cv, Verdict.OK if same else Verdict.REGRESSION, detail))
    seeds = sorted(set(b_ok["seed"]) & set(c_ok["seed"]))
    if seeds:
        ba = b_ok.set_index("seed").loc[seeds, "test_accuracy"].astype(float)
        ca = c_ok.set_index("seed").loc[seeds, "test_accuracy"].astype(float)
        drop = float(ba.mean() - ca.mean())
        # The baseline's spread over seeds is the known noise; the current side's spread could hide its own drop.
        spread = float(ba.std(ddof=1)) if len(seeds) > 1 else 0.0
        detail = f"{-drop:+.4f} over seeds {seeds} (threshold {t.max_accuracy_drop}, seed spread {spread:.4f})"
        if drop > t.max_accuracy_drop and drop > spread:
            verdict = Verdict.REGRESSION
        elif -drop > t.max_accuracy_drop and -drop > spread:
            verdict = Verdict.IMPROVED
        else:
            verdict = Verdict.OK
        checks.append(_check(ident, "accuracy", float(ba.mean()), float(ca.mean()), verdict, detail))
    return checks


def _epoch_times(rows: pd.DataFrame, runs: pd.DataFrame) -> _Sample | None:
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        return None
    return _Sample.of(pd.concat([tables.timed_epochs(rows[rows["run_id"] == r]) for r in ok["run_id"]]))


def _overhead(dp: _Sample | None, nondp: _Sample | None) -> _Sample | None:
    if dp is None or nondp is None or min(nondp.low, nondp.median) <= 0:
        return None
    return _Sample(dp.median / nondp.median, dp.low / nondp.high, dp.high / nondp.low)


def _speed_checks(
    base: tuple[pd.DataFrame, pd.DataFrame],
    cur: tuple[pd.DataFrame, pd.DataFrame],
    ident: dict[str, str],
    t: Thresholds,
    same_hardware: bool,
) -> list[Check]:
    """The DP overhead always; absolute seconds and peak memory only when both sides ran on the same hardware."""
    (b_rows, b_runs), (c_rows, c_runs) = base, cur
    samples = {}
    for side, rows, runs in (("base", b_rows, b_runs), ("cur", c_rows, c_runs)):
        dp, nondp = runs[runs["dp"].astype(bool)], runs[~runs["dp"].astype(bool)]
        samples[side] = {
            "dp_seconds": _epoch_times(rows, dp),
            "non_private_seconds": _epoch_times(rows, nondp),
            "dp_peak_memory_mb": _Sample.of(dp[dp["status"] == "ok"]["peak_memory_mb"]),
            "non_private_peak_memory_mb": _Sample.of(nondp[nondp["status"] == "ok"]["peak_memory_mb"]),
        }
        samples[side]["dp_overhead"] = _overhead(samples[side]["dp_seconds"], samples[side]["non_private_seconds"])
    checks = []
    for metric in (
        "dp_overhead",
        "dp_seconds",
        "non_private_seconds",
        "dp_peak_memory_mb",
        "non_private_peak_memory_mb",
    ):
        b, c = samples["base"][metric], samples["cur"][metric]
        if b is None or c is None:
            continue
        threshold = t.max_memory_growth if "memory" in metric else t.max_slowdown
        if metric == "dp_overhead" or (same_hardware and t.absolute):
            verdict, detail = _judge_growth(b, c, threshold)
        elif not same_hardware:
            verdict, detail = Verdict.INFO, "different hardware: absolute figures are not compared"
        else:
            verdict, detail = Verdict.INFO, "shown, not judged (--overhead-only)"
        checks.append(_check(ident, metric, b.median, c.median, verdict, detail))
    return checks


def _hardware(run_table: pd.DataFrame) -> list[str]:
    if run_table.empty:
        return []
    pairs = run_table[["hardware", "threads"]].dropna().drop_duplicates()
    return sorted(f"{h}, {int(n)} threads" for h, n in pairs.to_numpy())


def compare(current: ResultSet, baseline: ResultSet, thresholds: Thresholds | None = None) -> Comparison:
    """Every check of the current results against the baseline."""
    t = thresholds or Thresholds()
    c_rows, c_runs, c_unmatched = _keyed(current)
    b_rows, b_runs, b_unmatched = _keyed(baseline)
    if b_runs.empty or c_runs.empty:
        raise ResultsError("nothing to compare: one side has no runs")
    common = set(c_runs["config"]) & set(b_runs["config"])
    if not common:
        raise ResultsError(
            f"nothing to compare: no run in {current.source} has the settings of a run in {baseline.source} "
            "(different suites or workloads?)"
        )
    hardware_b, hardware_c = _hardware(b_runs), _hardware(c_runs)
    same_hardware = bool(hardware_b) and hardware_b == hardware_c
    checks: list[Check] = []
    for config in sorted(set(c_runs["config"]) | set(b_runs["config"])):
        b, c = b_runs[b_runs["config"] == config], c_runs[c_runs["config"] == config]
        first = (b if not b.empty else c).iloc[0]
        ident = {
            "suite": str(first["suite"]),
            "workload": str(first["workload"]),
            "label": first["label"],
            "privacy": first["privacy"],
        }
        if c.empty:
            checks.append(
                _check(ident, "status", first["status"], None, Verdict.MISSING, "no current run with these settings")
            )
        elif b.empty:
            checks.append(_check(ident, "status", None, first["status"], Verdict.NEW, "not in the baseline"))
        else:
            checks += _status_checks(b, c, ident)
            checks += _privacy_checks(b, c, ident, t)
    for section in sorted(set(c_runs["section"]) & set(b_runs["section"])):
        b, c = b_runs[b_runs["section"] == section], c_runs[c_runs["section"] == section]
        first = b.iloc[0]
        ident = {
            "suite": str(first["suite"]),
            "workload": str(first["workload"]),
            "label": first["label"],
            "privacy": "DP vs non-private",
        }
        checks += _speed_checks((b_rows, b), (c_rows, c), ident, t, same_hardware)
    checks += benchmark_checks(current.source, baseline.source)
    skipped = [f"{s.path}: {s.reason}" for r in (current, baseline) for s in r.skipped] + c_unmatched + b_unmatched
    return Comparison(checks=checks, baseline_hardware=hardware_b, current_hardware=hardware_c, skipped_files=skipped)


# --- micro-benchmarks (pytest-benchmark JSON stored beside the results) ---------------------------------------


def benchmark_files(source: Path) -> list[Path]:
    folder = (source if source.is_dir() else source.parent) / BENCHMARKS_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _benchmark_medians(files: list[Path]) -> dict[str, tuple[float, str]]:
    """name -> (median seconds, machine) from pytest-benchmark JSON files; unreadable files are ignored here."""
    out = {}
    for f in files:
        try:
            data = json.loads(f.read_text())
            machine = data.get("machine_info", {}).get("cpu", {}).get("brand_raw") or data.get("machine_info", {}).get(
                "node", ""
            )
            for b in data.get("benchmarks", []):
                out[f"{f.stem}::{b['name']}"] = (float(b["stats"]["median"]), str(machine))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def benchmark_checks(current: Path, baseline: Path) -> list[Check]:
    """Micro-benchmark medians side by side: shown, never judged (one process, no spread across machines)."""
    base, cur = _benchmark_medians(benchmark_files(baseline)), _benchmark_medians(benchmark_files(current))
    checks = []
    for name in sorted(set(base) | set(cur)):
        b, c = base.get(name), cur.get(name)
        group, _, test = name.partition("::")
        detail = "" if (b and c and b[1] == c[1]) else "machines differ or one side is missing"
        checks.append(
            Check(
                suite="micro-benchmarks",
                workload=group,
                label=test,
                privacy="",
                metric="benchmark",
                baseline=b[0] if b else None,
                current=c[0] if c else None,
                verdict=Verdict.INFO,
                detail=detail,
            )
        )
    return checks


# --- output -----------------------------------------------------------------------------------------------------


def _value(x: float | str | None, metric: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if metric == "accuracy":
        return f"{x:.4f}"
    if metric == "benchmark":
        return f"{x * 1e3:.3f} ms"
    return f"{x:.4g}"


def _summary(comparison: Comparison) -> str:
    counts = ", ".join(f"{n} {v}" for v, n in sorted(comparison.counts.items()))
    verdict = "FAIL" if comparison.failed else "PASS"
    return f"{verdict}: {len(comparison.checks)} checks ({counts})"


def _hardware_line(comparison: Comparison) -> str:
    same = "same hardware" if comparison.same_hardware else "different hardware: absolute times are shown, not judged"
    return f"baseline: {'; '.join(comparison.baseline_hardware)} | current: {'; '.join(comparison.current_hardware)} ({same})"


def format_text(comparison: Comparison, verbose: bool = False) -> str:
    lines = [_hardware_line(comparison)]
    rows = [c for c in comparison.checks if verbose or c.verdict != Verdict.OK]
    if rows:
        header = ("verdict", "suite/workload", "backend:variant", "privacy", "metric", "baseline", "current", "detail")
        table = [header] + [
            (
                c.verdict.value.upper() if c.verdict in FAILING else c.verdict.value,
                f"{c.suite}/{c.workload}",
                c.label,
                c.privacy,
                c.metric,
                _value(c.baseline, c.metric),
                _value(c.current, c.metric),
                c.detail,
            )
            for c in rows
        ]
        widths = [max(len(str(r[i])) for r in table) for i in range(len(header) - 1)]
        for r in table:
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + str(r[-1]))
    elif comparison.checks:
        lines.append("every check holds (use --verbose to list them)")
    for s in comparison.skipped_files:
        lines.append(f"skipped unreadable file {s}")
    lines.append(_summary(comparison))
    return "\n".join(lines) + "\n"


def format_markdown(comparison: Comparison, verbose: bool = False) -> str:
    from bench.report.markdown import escape

    lines = [f"**{_summary(comparison)}**", "", escape(_hardware_line(comparison)), ""]
    rows = [c for c in comparison.checks if verbose or c.verdict != Verdict.OK]
    if rows:
        lines += [
            "| verdict | workload | backend:variant | privacy | metric | baseline | current | detail |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in rows:
            cells = [
                c.verdict.value,
                f"{c.suite}/{c.workload}",
                c.label,
                c.privacy,
                c.metric,
                _value(c.baseline, c.metric),
                _value(c.current, c.metric),
                c.detail,
            ]
            lines.append("| " + " | ".join(escape(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


def format_json(comparison: Comparison) -> str:
    def finite(x: object) -> object:
        return None if isinstance(x, float) and not math.isfinite(x) else x

    def check(c: Check) -> dict[str, Any]:
        fields = {k: finite(v) for k, v in asdict(c).items() if k != "verdict"}
        return {**fields, "verdict": c.verdict.value, "change": finite(c.change)}

    doc = {
        "passed": not comparison.failed,
        "exit_code": comparison.exit_code,
        "counts": comparison.counts,
        "same_hardware": comparison.same_hardware,
        "baseline_hardware": comparison.baseline_hardware,
        "current_hardware": comparison.current_hardware,
        "skipped_files": comparison.skipped_files,
        "checks": [check(c) for c in comparison.checks],
    }
    return json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n"
