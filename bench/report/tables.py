"""The tables behind every chart: pure pandas over result rows (one row per run and epoch).

A *section* is one suite's workload: runs in it share data, model and training settings, so they compare.
A *series* is one backend/variant (`label`), coloured the same everywhere in a report.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

SECTION = ["suite", "workload"]
NON_PRIVATE = "non-private"
DP, NONDP = "DP", "non-private"
PLD, RDP = "PLD (core)", "RDP (core)"


def label(backend: object, variant: object) -> str:
    return f"{backend}:{variant}" if variant and not pd.isna(variant) else str(backend)


def _fmt_number(x: float) -> str:
    return f"{x:g}"


def privacy_level(row: pd.Series) -> str:
    """How a run's privacy was asked for: 'non-private', 'ε=1' (target) or 'σ=0.8' (noise multiplier)."""
    if not row["dp"]:
        return NON_PRIVATE
    if pd.notna(row["target_epsilon"]):
        return f"ε={_fmt_number(row['target_epsilon'])}"
    return f"σ={_fmt_number(row['noise_multiplier'])}"


def _privacy_order(row: pd.Series) -> tuple:
    if not row["dp"]:
        return (0, 0.0, 0.0)
    eps = row["target_epsilon"] if pd.notna(row["target_epsilon"]) else math.inf
    sigma = row["noise_multiplier"] if pd.notna(row["noise_multiplier"]) else 0.0
    return (1, eps, -sigma)


def timed_epochs(group: pd.DataFrame) -> pd.Series:
    """Epoch times that measure steady-state speed: every epoch after the first (which compiles), if any."""
    done = group.dropna(subset=["epoch"])
    later = done[done["epoch"] >= 2]
    return (later if not later.empty else done)["epoch_seconds"].dropna()


def runs(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its settings, last finished epoch, status and reason, speed and peak memory."""
    if rows.empty:
        return pd.DataFrame(columns=[*SECTION, "run_id", "label", "privacy", "status"])
    out = []
    for run_id, group in rows.groupby("run_id", sort=False):
        group = group.sort_values("epoch", na_position="first")
        last = group.iloc[-1]
        timed = timed_epochs(group)
        epochs_done = int(group["epoch"].max()) if group["epoch"].notna().any() else 0
        out.append(
            {
                **last.to_dict(),
                "run_id": run_id,
                "label": label(last["backend"], last["variant"]),
                "privacy": privacy_level(last),
                "privacy_order": _privacy_order(last),
                "epochs_done": epochs_done,
                "seconds_per_epoch": float(timed.median()) if not timed.empty else np.nan,
                "peak_memory_mb": float(group["peak_memory_mb"].max())
                if group["peak_memory_mb"].notna().any()
                else np.nan,
                "error": last["error"] if isinstance(last["error"], str) else "",
            }
        )
    frame = pd.DataFrame(out)
    return frame.sort_values([*SECTION, "privacy_order", "label", "seed"], key=_sort_key).reset_index(drop=True)


def _sort_key(col: pd.Series) -> pd.Series:
    return col.map(str) if col.name != "privacy_order" and col.dtype == object else col


def _ok(run_table: pd.DataFrame) -> pd.DataFrame:
    return run_table[run_table["status"] == "ok"] if not run_table.empty else run_table


def _spread(values: pd.Series) -> dict[str, float]:
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
    }


SETTINGS = [
    "dataset",
    "model",
    "noise_multiplier",
    "max_grad_norm",
    "batch_size",
    "sample_rate",
    "delta",
    "epochs",
    "optimizer",
    "learning_rate",
    "sampling",
]


def privacy_accuracy(run_table: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy per series and privacy level: mean, std, min and max over seeds, with the final epsilon.

    Non-private rows (dp False, epsilon NaN) are the reference lines. `poisson_assumed` marks levels whose
    sampling is not Poisson, so their epsilon is not a guarantee.
    """
    ok = _ok(run_table)
    out = []
    for (suite, workload, lab, privacy), g in ok.groupby([*SECTION, "label", "privacy"], sort=False):
        acc = _spread(g["test_accuracy"].dropna()) if g["test_accuracy"].notna().any() else None
        if acc is None:
            continue
        first = g.iloc[0]
        out.append(
            {
                "suite": suite,
                "workload": workload,
                "label": lab,
                "privacy": privacy,
                "dp": bool(first["dp"]),
                "epsilon": float(g["epsilon"].mean()) if first["dp"] else np.nan,
                "epsilon_rdp": float(g["epsilon_rdp"].mean()) if first["dp"] else np.nan,
                "target_epsilon": first["target_epsilon"],
                "accuracy": acc["mean"],
                "accuracy_std": acc["std"],
                "accuracy_min": acc["min"],
                "accuracy_max": acc["max"],
                "seeds": int(g["seed"].nunique()),
                "poisson_assumed": bool(first["dp"]) and first["sampling"] != "poisson",
                **{k: first[k] for k in SETTINGS},
            }
        )
    return pd.DataFrame(out, columns=_PA_COLUMNS)


_PA_COLUMNS = [
    *SECTION,
    "label",
    "privacy",
    "dp",
    "epsilon",
    "epsilon_rdp",
    "target_epsilon",
    "accuracy",
    "accuracy_std",
    "accuracy_min",
    "accuracy_max",
    "seeds",
    "poisson_assumed",
    *SETTINGS,
]


def _per_mode(rows: pd.DataFrame, run_table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Median and range of a per-epoch or per-run metric for each series, DP and non-private apart."""
    ok = _ok(run_table)
    out = []
    for (suite, workload, lab, dp), g in ok.groupby([*SECTION, "label", "dp"], sort=False):
        if metric == "seconds":
            values = pd.concat([timed_epochs(rows[rows["run_id"] == r]) for r in g["run_id"]])
        else:
            values = g[metric].dropna()
        if values.empty:
            continue
        out.append(
            {
                "suite": suite,
                "workload": workload,
                "label": lab,
                "mode": DP if dp else NONDP,
                "value": float(values.median()),
                "value_min": float(values.min()),
                "value_max": float(values.max()),
                "measurements": len(values),
                "runs": len(g),
                "batch_size": g["batch_size"].iloc[0],
                "threads": g["threads"].iloc[0],
                "hardware": g["hardware"].iloc[0],
            }
        )
    return pd.DataFrame(
        out,
        columns=[*SECTION, "label", "mode", "value", "value_min", "value_max", "measurements", "runs"]
        + ["batch_size", "threads", "hardware"],
    )


def speed(rows: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """Median seconds per epoch (epochs after the first, pooled over seeds and privacy levels) per series and mode.

    `dp_overhead` is DP / non-private of the same series in the same section; `vs_fastest` is the time over the
    fastest series of the same mode in the section. Either is NaN when its other half has no ok run.
    """
    table = _per_mode(rows, run_table, "seconds").rename(
        columns={"value": "seconds", "value_min": "seconds_min", "value_max": "seconds_max"}
    )
    return _with_ratios(table, "seconds")


def memory(run_table: pd.DataFrame) -> pd.DataFrame:
    """Peak memory (MB, the largest over a run's epochs) per series and mode: median and range over runs."""
    table = _per_mode(pd.DataFrame(), run_table, "peak_memory_mb").rename(
        columns={"value": "peak_memory_mb", "value_min": "peak_memory_mb_min", "value_max": "peak_memory_mb_max"}
    )
    return _with_ratios(table, "peak_memory_mb")


def _with_ratios(table: pd.DataFrame, value: str) -> pd.DataFrame:
    if table.empty:
        return table.assign(dp_overhead=pd.Series(dtype=float), vs_fastest=pd.Series(dtype=float))
    best = table.groupby([*SECTION, "mode"])[value].transform("min")
    table = table.assign(vs_fastest=table[value] / best)
    wide = table.pivot_table(index=[*SECTION, "label"], columns="mode", values=value, aggfunc="first")
    for mode in (DP, NONDP):
        if mode not in wide:
            wide[mode] = np.nan
    overhead = (wide[DP] / wide[NONDP]).rename("dp_overhead").reset_index()
    return table.merge(overhead, on=[*SECTION, "label"], how="left")


def learning_curves(rows: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy per epoch of ok runs: mean, min and max over seeds per series and privacy level."""
    ok = _ok(run_table)
    if ok.empty:
        return pd.DataFrame(columns=[*SECTION, "label", "privacy", "epoch", "accuracy", "accuracy_min", "accuracy_max"])
    keyed = rows.merge(ok[["run_id", "label", "privacy"]], on="run_id").dropna(subset=["epoch", "test_accuracy"])
    grouped = keyed.groupby([*SECTION, "label", "privacy", "epoch"], sort=True)["test_accuracy"]
    out = grouped.agg(accuracy="mean", accuracy_min="min", accuracy_max="max", seeds="count").reset_index()
    out["epoch"] = out["epoch"].astype(int)
    return out


def epsilon_curves(rows: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """Epsilon after each epoch of ok DP runs from the core's PLD and RDP accountants and each backend's own figure.

    The core's figures depend only on the workload and privacy level (`label` is empty); a backend's own figure
    (`label` set) is NaN-free only where the backend reports one.
    """
    columns = [*SECTION, "privacy", "epoch", "accountant", "label", "epsilon"]
    ok = _ok(run_table)
    ok = ok[ok["dp"].astype(bool)] if not ok.empty else ok
    if ok.empty:
        return pd.DataFrame(columns=columns)
    keyed = rows.merge(ok[["run_id", "label", "privacy"]], on="run_id").dropna(subset=["epoch"])
    keyed = keyed.assign(epoch=keyed["epoch"].astype(int))
    parts = []
    for column, accountant in (("epsilon", PLD), ("epsilon_rdp", RDP)):
        core = keyed.dropna(subset=[column]).groupby([*SECTION, "privacy", "epoch"])[column].mean().reset_index()
        parts.append(core.rename(columns={column: "epsilon"}).assign(accountant=accountant, label=""))
    own = keyed.dropna(subset=["epsilon_reported"])
    own = own.groupby([*SECTION, "privacy", "label", "epoch"])["epsilon_reported"].mean().reset_index()
    parts.append(own.rename(columns={"epsilon_reported": "epsilon"}).assign(accountant=own["label"] + " (own)"))
    return pd.concat(parts, ignore_index=True)[columns]


def provenance(run_table: pd.DataFrame) -> pd.DataFrame:
    """Where and with what each series ran: framework versions, Python, hardware, threads, commit, dates."""
    columns = ["label", "versions", "python", "hardware", "threads", "git_commit", "started", "finished", "runs"]
    if run_table.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for lab, g in run_table.groupby("label", sort=True):
        out.append(
            {
                "label": lab,
                "versions": "; ".join(sorted({_versions(v) for v in g["versions"].dropna()} - {""})),
                "python": ", ".join(sorted(set(g["python"].dropna().astype(str)))),
                "hardware": ", ".join(sorted(set(g["hardware"].dropna().astype(str)))),
                "threads": ", ".join(str(int(t)) for t in sorted(set(g["threads"].dropna()))),
                "git_commit": ", ".join(sorted(set(g["git_commit"].dropna().astype(str)) - {""})),
                "started": g["started_at"].min(),
                "finished": g["finished_at"].max(),
                "runs": len(g),
            }
        )
    return pd.DataFrame(out, columns=columns)


def _versions(raw: str) -> str:
    try:
        parsed = json.loads(raw)
    except (TypeError, ValueError):
        return str(raw)
    if not isinstance(parsed, dict):
        return str(raw)
    return ", ".join(f"{k} {v}" for k, v in sorted(parsed.items()))


def sections(run_table: pd.DataFrame) -> list[tuple[str, str]]:
    """The (suite, workload) pairs in report order."""
    if run_table.empty:
        return []
    pairs = run_table[SECTION].astype(str).drop_duplicates()
    return sorted(map(tuple, pairs.to_numpy()))


def status_counts(run_table: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in run_table["status"].value_counts().items()} if not run_table.empty else {}
