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
FEDERATED = "federated"


def label(backend: object, variant: object) -> str:
    return f"{backend}:{variant}" if variant and not pd.isna(variant) else str(backend)


def _fmt_number(x: float) -> str:
    return f"{x:g}"


def is_federated(row: pd.Series) -> bool:
    """Whether a result row (or run) is a federated (DP-FedAvg) run; rows without the column are DP-SGD runs."""
    return row.get("workload_kind") == FEDERATED


# Marks every ε (and privacy level) of a DP run whose sampling is not the Poisson sampling the accountants assume.
SHUFFLE_MARK = "†"


def privacy_level(row: pd.Series) -> str:
    """How a run's privacy was asked for: 'non-private', 'ε=1' (target) or 'σ=0.8' (noise multiplier).

    Federated runs also name their noise and clients per round, which tell calibrated runs apart. A DP run with
    shuffle sampling is marked 'σ=0.8 †': its ε assumes Poisson sampling, so wherever the level is shown, so is that.
    """
    if is_federated(row):
        return federated_privacy_level(row)
    if not row["dp"]:
        return NON_PRIVATE
    if pd.notna(row["target_epsilon"]):
        level = f"ε={_fmt_number(row['target_epsilon'])}"
    else:
        level = f"σ={_fmt_number(row['noise_multiplier'])}"
    return f"{level} {SHUFFLE_MARK}" if row.get("sampling") == "shuffle" else level


def federated_privacy_level(row: pd.Series) -> str:
    """'σ=0.5 · 50/round', 'σ=1.2 · 120/round (ε=2 target)' or 'non-private · 50/round'."""
    clients = f" · {int(row['clients_per_round'])}/round" if pd.notna(row.get("clients_per_round")) else ""
    if not row["dp"]:
        return NON_PRIVATE + clients
    sigma = f"σ={row['noise_multiplier']:.3g}" if pd.notna(row["noise_multiplier"]) else "σ=?"
    target = f" (ε={_fmt_number(row['target_epsilon'])} target)" if pd.notna(row["target_epsilon"]) else ""
    return sigma + clients + target


def _privacy_order(row: pd.Series) -> tuple:
    clients = row.get("clients_per_round")
    extra = (float(clients) if pd.notna(clients) else 0.0,) if is_federated(row) else ()
    if not row["dp"]:
        return (0, 0.0, 0.0, *extra)
    eps = row["target_epsilon"] if pd.notna(row["target_epsilon"]) else math.inf
    sigma = row["noise_multiplier"] if pd.notna(row["noise_multiplier"]) else 0.0
    return (1, eps, -sigma, *extra)


def number_text(value: object, spec: str = ".4g", suffix: str = "") -> str:
    """A number for a table cell (Markdown or HTML, before escaping): '—' when missing or not a number."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(x) else format(x, spec) + suffix


def epsilon_text(value: object, spec: str = ".3f") -> str:
    """An epsilon for a table: '—' when missing, '∞ (no noise)' when infinite (a DP run with noise 0)."""
    text = number_text(value, spec)
    return "∞ (no noise)" if text in ("inf", "-inf") else text


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


def federated_mask(frame: pd.DataFrame) -> pd.Series:
    """Which rows of a result or run table are federated; tables without `workload_kind` hold DP-SGD runs only."""
    if "workload_kind" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["workload_kind"] == FEDERATED


def _steady(group: pd.DataFrame, column: str) -> pd.Series:
    """A per-round (per-epoch) time of every round after the first, or of the only one: as `timed_epochs`."""
    done = group.dropna(subset=["epoch"])
    later = done[done["epoch"] >= 2]
    return (later if not later.empty else done)[column].dropna()


def _median(values: pd.Series) -> float:
    return float(values.median()) if not values.empty else np.nan


def _last(values: pd.Series) -> tuple[float, object]:
    """The last non-null value of a column sorted by round, and its index; NaN and None when there is none."""
    values = values.dropna()
    return (float(values.iloc[-1]), values.index[-1]) if not values.empty else (np.nan, None)


FEDERATED_COLUMNS = [
    *SECTION,
    "run_id",
    "label",
    "privacy",
    "privacy_order",
    "seed",
    "status",
    "dp",
    "total_clients",
    "clients_per_round",
    "noise_multiplier",
    "target_epsilon",
    "epsilon",
    "epsilon_rdp",
    "accuracy",
    "accuracy_round",
    "clip_norm",
    "unclipped_fraction",
    "seconds_per_round",
    "train_seconds_per_round",
    "rounds_done",
    "rounds",
]


def federated_runs(rows: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """One row per federated run, whatever its status, in run-table order.

    Final ε (PLD and RDP, inf for noise 0), the last evaluated test accuracy and its round, the clip norm and
    unclipped fraction of the last round, and median seconds per round (whole round; the backends' local
    training alone) over the rounds after the first.
    """
    fed = run_table[federated_mask(run_table)] if not run_table.empty else run_table
    out = []
    for _, run in fed.iterrows():
        group = rows[rows["run_id"] == run["run_id"]].sort_values("epoch", na_position="first")
        accuracy, at = _last(group["test_accuracy"])
        clip, clip_at = _last(group["clip_norm"])
        out.append(
            {
                **{k: run[k] for k in [*SECTION, "run_id", "label", "privacy", "privacy_order", "seed", "status"]},
                "dp": bool(run["dp"]),
                **{k: run[k] for k in ("total_clients", "clients_per_round", "noise_multiplier", "target_epsilon")},
                "epsilon": float(run["epsilon"]) if pd.notna(run["epsilon"]) else np.nan,
                "epsilon_rdp": float(run["epsilon_rdp"]) if pd.notna(run["epsilon_rdp"]) else np.nan,
                "accuracy": accuracy,
                "accuracy_round": int(group.loc[at, "epoch"]) if at is not None else None,
                "clip_norm": clip,
                "unclipped_fraction": group.loc[clip_at, "unclipped_fraction"] if clip_at is not None else np.nan,
                "seconds_per_round": _median(_steady(group, "epoch_seconds")),
                "train_seconds_per_round": _median(_steady(group, "train_seconds")),
                "rounds_done": int(run["epochs_done"]),
                "rounds": run["rounds"],
            }
        )
    return pd.DataFrame(out, columns=FEDERATED_COLUMNS)


def federated_privacy_accuracy(run_table: pd.DataFrame) -> pd.DataFrame:
    """`privacy_accuracy` with each level's clients per round, total clients and rounds (of its first ok run)."""
    table = privacy_accuracy(run_table)
    keys = [*SECTION, "label", "privacy"]
    clients = _ok(run_table).drop_duplicates(keys)[[*keys, "clients_per_round", "total_clients", "rounds"]]
    return table.merge(clients, on=keys, how="left")


def round_accuracy(rows: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy at each evaluation round of ok runs (rounds without one are left out): mean, min and max over
    seeds per series and privacy level."""
    return learning_curves(rows, run_table).rename(columns={"epoch": "round"})


def clip_curves(rows: pd.DataFrame, run_table: pd.DataFrame) -> pd.DataFrame:
    """The adaptive clip norm of each round of ok DP runs and the fraction of clients under it: means over seeds."""
    columns = [*SECTION, "label", "privacy", "round", "clip_norm", "unclipped_fraction", "seeds"]
    ok = _ok(run_table)
    ok = ok[ok["dp"].astype(bool)] if not ok.empty else ok
    if ok.empty:
        return pd.DataFrame(columns=columns)
    keyed = rows.merge(ok[["run_id", "label", "privacy"]], on="run_id").dropna(subset=["epoch", "clip_norm"])
    grouped = keyed.groupby([*SECTION, "label", "privacy", "epoch"], sort=True)
    out = grouped.agg(
        clip_norm=("clip_norm", "mean"), unclipped_fraction=("unclipped_fraction", "mean"), seeds=("run_id", "nunique")
    ).reset_index()
    out = out.rename(columns={"epoch": "round"}).assign(round=lambda t: t["round"].astype(int))
    return out[columns]


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
