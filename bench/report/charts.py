"""Vega-Lite charts (Altair) for one report section, drawn from the tables in `bench.report.tables`."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from bench.report import tables

# Tableau 10, then its lighter partners: one fixed colour per backend/variant across the whole report.
PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
    "#a0cbe8", "#ffbe7d", "#ff9d9a", "#86bcb6", "#8cd17d", "#f1ce63", "#d4a6c8", "#fabfd2", "#d7b5a6", "#79706e",
]  # fmt: skip
WIDTH = 420
HEIGHT = 260


def color_scale(labels: list[str]) -> alt.Scale:
    """The same colour for a series in every chart: `labels` is every series in the report, sorted."""
    return alt.Scale(domain=labels, range=[PALETTE[i % len(PALETTE)] for i in range(len(labels))])


def _series(scale: alt.Scale, data: pd.DataFrame) -> alt.Color:
    """Colour by series on the report-wide scale; the legend lists only the series this chart shows."""
    present = sorted(data["label"].dropna().unique()) if "label" in data else []
    present = [label for label in present if label]
    return alt.Color("label:N", scale=scale, title="backend:variant", legend=alt.Legend(values=present))


def _settings_tooltip() -> list[alt.Tooltip]:
    return [
        alt.Tooltip("noise_multiplier:Q", title="noise multiplier σ", format=".4g"),
        alt.Tooltip("max_grad_norm:Q", title="clipping norm C", format=".4g"),
        alt.Tooltip("batch_size:Q", title="expected batch"),
        alt.Tooltip("sample_rate:Q", title="sample rate q", format=".4g"),
        alt.Tooltip("delta:Q", title="δ", format=".1e"),
        alt.Tooltip("epochs:Q", title="epochs"),
        alt.Tooltip("optimizer:N", title="optimizer"),
        alt.Tooltip("learning_rate:Q", title="learning rate", format=".4g"),
        alt.Tooltip("sampling:N", title="sampling"),
    ]


def _federated_tooltip() -> list[alt.Tooltip]:
    """A federated run's settings: clients and rounds, and what DP-SGD's columns mean for one."""
    return [
        alt.Tooltip("noise_multiplier:Q", title="noise multiplier σ", format=".4g"),
        alt.Tooltip("clients_per_round:Q", title="expected clients per round"),
        alt.Tooltip("total_clients:Q", title="clients"),
        alt.Tooltip("sample_rate:Q", title="client sampling rate q", format=".4g"),
        alt.Tooltip("rounds:Q", title="rounds"),
        alt.Tooltip("max_grad_norm:Q", title="initial clip norm", format=".4g"),
        alt.Tooltip("delta:Q", title="δ", format=".1e"),
        alt.Tooltip("epochs:Q", title="local epochs"),
        alt.Tooltip("batch_size:Q", title="client batch"),
        alt.Tooltip("optimizer:N", title="client optimizer"),
        alt.Tooltip("learning_rate:Q", title="client learning rate", format=".4g"),
    ]


def infinite_epsilon(table: pd.DataFrame, column: str = "epsilon") -> pd.Series:
    """Rows whose epsilon is infinite (DP with noise 0), which neither JSON nor a log axis can hold."""
    return pd.Series(np.isinf(table[column].astype(float)), index=table.index)


def privacy_accuracy(table: pd.DataFrame, scale: alt.Scale, title: str) -> alt.LayerChart:
    """Final test accuracy against epsilon (log axis), mean with min-max over seeds; non-private as dashed rules.

    DP levels with an infinite epsilon (noise 0) are drawn as dotted rules at their accuracy, not on the ε axis.
    """
    dp_all = table[table["dp"].astype(bool)]
    unbounded = dp_all[infinite_epsilon(dp_all)].drop(columns=["epsilon", "epsilon_rdp"])
    dp = dp_all[~infinite_epsilon(dp_all)].assign(
        sampling_mark=lambda t: t["poisson_assumed"].map({True: "ε assumes Poisson", False: "Poisson"}),
        epsilon_rdp=lambda t: t["epsilon_rdp"].replace(np.inf, np.nan),
    )
    ref = table[~table["dp"].astype(bool)]
    federated = "clients_per_round" in table
    tooltip = [
        alt.Tooltip("label:N", title="backend:variant"),
        alt.Tooltip("privacy:N", title="privacy"),
        alt.Tooltip("epsilon:Q", title="ε (PLD)", format=".3f"),
        alt.Tooltip("epsilon_rdp:Q", title="ε (RDP)", format=".3f"),
        alt.Tooltip("accuracy:Q", title="test accuracy (mean)", format=".4f"),
        alt.Tooltip("accuracy_std:Q", title="std over seeds", format=".4f"),
        alt.Tooltip("accuracy_min:Q", title="min", format=".4f"),
        alt.Tooltip("accuracy_max:Q", title="max", format=".4f"),
        alt.Tooltip("seeds:Q", title="seeds"),
        *(_federated_tooltip() if federated else _settings_tooltip()),
    ]
    all_acc = pd.concat([table["accuracy_min"], table["accuracy_max"]])
    y = alt.Y("accuracy:Q", title="final test accuracy", scale=alt.Scale(zero=False, domain=_pad(all_acc)))
    layers = []
    if not dp.empty:
        eps = dp["epsilon"]
        domain = [float(eps.min()) / 1.5, float(eps.max()) * 1.5]
        x = alt.X("epsilon:Q", title="ε (PLD, log scale)", scale=alt.Scale(type="log", domain=domain, nice=False))
        base = alt.Chart(dp).encode(x=x, color=_series(scale, table))
        layers += [
            base.mark_line(opacity=0.6).encode(y=y, detail="label:N"),
            base.mark_rule().encode(y="accuracy_min:Q", y2="accuracy_max:Q"),
            base.mark_point(filled=True, size=70).encode(
                y=y, shape=alt.Shape("sampling_mark:N", title="sampling"), tooltip=tooltip
            ),
        ]
    if not ref.empty:
        ref_tooltip = [t for t in tooltip if t.title not in ("ε (PLD)", "ε (RDP)", "noise multiplier σ")]
        layers.append(
            alt.Chart(ref)
            .mark_rule(strokeDash=[6, 4], strokeWidth=1.5)
            .encode(y=y, color=_series(scale, table), tooltip=ref_tooltip)
        )
    if not unbounded.empty:
        free_tooltip = [t for t in tooltip if t.title not in ("ε (PLD)", "ε (RDP)")]
        layers.append(
            alt.Chart(unbounded)
            .mark_rule(strokeDash=[2, 3], strokeWidth=1.5)
            .encode(y=y, color=_series(scale, table), tooltip=free_tooltip)
        )
    return alt.layer(*layers).properties(title=title, width=WIDTH, height=HEIGHT)


def _pad(values: pd.Series) -> list[float]:
    lo, hi = float(values.min()), float(values.max())
    pad = max((hi - lo) * 0.08, 0.005)
    return [max(lo - pad, 0.0), min(hi + pad, 1.0)]


def _by_mode(table: pd.DataFrame, value: str, unit: str, scale: alt.Scale, title: str, log: bool) -> alt.LayerChart:
    """One row per series, DP (filled) and non-private (hollow) side by side, with the range over measurements."""
    x_scale = alt.Scale(type="log") if log else alt.Scale(zero=True)
    x_title = unit + (" (log scale)" if log else "")
    x = alt.X(f"{value}:Q", title=x_title, scale=x_scale, axis=alt.Axis(labelOverlap=True, tickCount=6))
    y = alt.Y("label:N", title=None, sort=sorted(table["label"].unique()))
    offset = alt.YOffset("mode:N", sort=[tables.DP, tables.NONDP])
    tooltip = [
        alt.Tooltip("label:N", title="backend:variant"),
        alt.Tooltip("mode:N", title="mode"),
        alt.Tooltip(f"{value}:Q", title=f"median {unit}", format=".4g"),
        alt.Tooltip(f"{value}_min:Q", title="min", format=".4g"),
        alt.Tooltip(f"{value}_max:Q", title="max", format=".4g"),
        alt.Tooltip("dp_overhead:Q", title="DP overhead (DP / non-private)", format=".2f"),
        alt.Tooltip("vs_fastest:Q", title="vs best of this mode", format=".2f"),
        alt.Tooltip("measurements:Q", title="measurements"),
        alt.Tooltip("runs:Q", title="runs"),
        alt.Tooltip("batch_size:Q", title="expected batch"),
        alt.Tooltip("threads:Q", title="threads"),
        alt.Tooltip("hardware:N", title="hardware"),
    ]
    base = alt.Chart(table).encode(y=y, yOffset=offset, color=_series(scale, table))
    rule = base.mark_rule().encode(x=alt.X(f"{value}_min:Q", scale=x_scale, title=x_title), x2=f"{value}_max:Q")
    points = base.mark_point(size=80, strokeWidth=2).encode(
        x=x,
        shape=alt.Shape(
            "mode:N",
            sort=[tables.DP, tables.NONDP],
            title="mode",
            legend=alt.Legend(symbolStrokeColor="#444", symbolFillColor="#444", symbolStrokeWidth=1.5),
        ),
        fill=alt.condition(f"datum.mode == '{tables.DP}'", _series(scale, table), alt.value("white")),
        tooltip=tooltip,
    )
    height = max(60, 34 * table["label"].nunique())
    return alt.layer(rule, points).properties(title=title, width=WIDTH, height=height)


def speed(table: pd.DataFrame, scale: alt.Scale) -> alt.LayerChart:
    return _by_mode(table, "seconds", "seconds per epoch", scale, "Speed: median seconds per epoch", log=True)


def overhead(table: pd.DataFrame, scale: alt.Scale) -> alt.LayerChart:
    """DP seconds per epoch over the same series' non-private seconds per epoch."""
    data = table[table["mode"] == tables.DP].dropna(subset=["dp_overhead"])
    data = data.assign(text=data["dp_overhead"].map(lambda r: f"{r:.2g}×"))
    y = alt.Y("label:N", title=None, sort=sorted(data["label"].unique()))
    x = alt.X("dp_overhead:Q", title="DP / non-private seconds per epoch (same backend)", scale=alt.Scale(zero=True))
    tooltip = [
        alt.Tooltip("label:N", title="backend:variant"),
        alt.Tooltip("dp_overhead:Q", title="DP overhead", format=".3f"),
        alt.Tooltip("seconds:Q", title="DP s/epoch", format=".4g"),
        alt.Tooltip("vs_fastest:Q", title="DP vs fastest DP", format=".2f"),
    ]
    base = alt.Chart(data).encode(y=y, x=x)
    bars = base.mark_bar().encode(color=_series(scale, data), tooltip=tooltip)
    text = base.mark_text(align="left", dx=4).encode(text="text:N")
    return alt.layer(bars, text).properties(
        title="DP overhead", width=WIDTH, height=max(60, 24 * data["label"].nunique())
    )


def memory(table: pd.DataFrame, scale: alt.Scale) -> alt.LayerChart:
    return _by_mode(table, "peak_memory_mb", "peak memory (MB)", scale, "Peak memory", log=False)


def learning_curves(table: pd.DataFrame, scale: alt.Scale, privacy_order: list[str]) -> alt.FacetChart:
    """Test accuracy after each epoch, mean over seeds, one panel per privacy level."""
    tooltip = [
        alt.Tooltip("label:N", title="backend:variant"),
        alt.Tooltip("privacy:N"),
        alt.Tooltip("epoch:Q"),
        alt.Tooltip("accuracy:Q", title="test accuracy (mean)", format=".4f"),
        alt.Tooltip("accuracy_min:Q", title="min", format=".4f"),
        alt.Tooltip("accuracy_max:Q", title="max", format=".4f"),
        alt.Tooltip("seeds:Q"),
    ]
    base = alt.Chart().encode(
        x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d"), title="epoch"),
        y=alt.Y("accuracy:Q", title="test accuracy", scale=alt.Scale(zero=False)),
        color=_series(scale, table),
    )
    layer = alt.layer(base.mark_line(), base.mark_point(filled=True, size=40).encode(tooltip=tooltip), data=table)
    return (
        layer.properties(width=260, height=200)
        .facet(facet=alt.Facet("privacy:N", sort=privacy_order, title=None), columns=4)
        .properties(title="Learning curves: test accuracy per epoch")
    )


def epsilon_curves(
    table: pd.DataFrame, scale: alt.Scale, privacy_order: list[str], step: str = "epoch"
) -> alt.FacetChart:
    """Epsilon after each epoch (or round): the core's PLD and RDP (grey lines) and each backend's own figure (its
    colour). Infinite epsilons (noise 0) are left out."""
    table = table[~infinite_epsilon(table)]
    if step != "epoch":
        table = table.rename(columns={"epoch": step})
    tooltip = [
        alt.Tooltip("accountant:N"),
        alt.Tooltip("privacy:N"),
        alt.Tooltip(f"{step}:Q"),
        alt.Tooltip("epsilon:Q", title="ε", format=".4f"),
    ]
    x = alt.X(f"{step}:Q", axis=alt.Axis(tickMinStep=1, format="d"), title=step)
    y = alt.Y("epsilon:Q", title="ε")
    core = (
        alt.Chart()
        .transform_filter("datum.label == ''")
        .encode(
            x=x,
            y=y,
            strokeDash=alt.StrokeDash("accountant:N", title="core accountant", sort=[tables.PLD, tables.RDP]),
            tooltip=tooltip,
        )
        .mark_line(color="#555", point=alt.OverlayMarkDef(color="#555"))
    )
    own = (
        alt.Chart()
        .transform_filter("datum.label != ''")
        .encode(
            x=x, y=y, color=_series(scale, table), tooltip=[alt.Tooltip("label:N", title="backend:variant"), *tooltip]
        )
        .mark_point(size=60, shape="diamond", filled=True)
    )
    return (
        alt.layer(core, own, data=table)
        .properties(width=260, height=200)
        .facet(
            facet=alt.Facet("privacy:N", sort=[p for p in privacy_order if p != tables.NON_PRIVATE], title=None),
            columns=4,
        )
        .properties(title=f"ε per {step}: core PLD and RDP, and each backend's own accountant")
    )


def privacy_scale(privacy_order: list[str]) -> alt.Scale:
    """One colour per privacy level of a section, in its privacy order (a palette apart from the backends')."""
    return alt.Scale(domain=privacy_order, scheme="dark2")


def per_round(
    table: pd.DataFrame, value: str, y_title: str, title: str, privacy_order: list[str], tooltip: list[alt.Tooltip]
) -> alt.FacetChart:
    """A per-round value, one line per privacy level (colour), one panel per backend:variant."""
    present = [p for p in privacy_order if p in set(table["privacy"])]
    base = alt.Chart().encode(
        x=alt.X("round:Q", axis=alt.Axis(tickMinStep=1, format="d"), title="round"),
        y=alt.Y(f"{value}:Q", title=y_title, scale=alt.Scale(zero=False)),
        color=alt.Color(
            "privacy:N",
            scale=privacy_scale(privacy_order),
            sort=privacy_order,
            title="privacy",
            legend=alt.Legend(values=present),
        ),
    )
    tips = [alt.Tooltip("label:N", title="backend:variant"), alt.Tooltip("privacy:N"), alt.Tooltip("round:Q")]
    layer = alt.layer(
        base.mark_line(), base.mark_point(filled=True, size=30).encode(tooltip=tips + tooltip), data=table
    )
    return (
        layer.properties(width=300, height=220)
        .facet(facet=alt.Facet("label:N", sort=sorted(table["label"].unique()), title=None), columns=3)
        .properties(title=title)
    )


def round_accuracy(table: pd.DataFrame, privacy_order: list[str]) -> alt.FacetChart:
    """Test accuracy at each evaluation round, mean over seeds: one line per privacy level, a panel per backend."""
    tooltip = [
        alt.Tooltip("accuracy:Q", title="test accuracy (mean)", format=".4f"),
        alt.Tooltip("accuracy_min:Q", title="min", format=".4f"),
        alt.Tooltip("accuracy_max:Q", title="max", format=".4f"),
        alt.Tooltip("seeds:Q"),
    ]
    title = "Test accuracy per round (evaluation rounds)"
    return per_round(table, "accuracy", "test accuracy", title, privacy_order, tooltip)


def clip_curves(table: pd.DataFrame, privacy_order: list[str]) -> alt.FacetChart:
    """The adaptive clip norm of each round, mean over seeds: one line per privacy level, a panel per backend."""
    tooltip = [
        alt.Tooltip("clip_norm:Q", title="clip norm", format=".4g"),
        alt.Tooltip("unclipped_fraction:Q", title="clients not clipped", format=".2f"),
        alt.Tooltip("seeds:Q"),
    ]
    title = "Adaptive clip norm per round"
    return per_round(table, "clip_norm", "clip norm", title, privacy_order, tooltip)
