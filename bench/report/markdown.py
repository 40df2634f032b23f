"""A short Markdown summary of a report for CI logs and pull requests: one table per workload."""

from __future__ import annotations

import math
import re

import pandas as pd

from bench.report import privacy, tables
from bench.report.model import Report, Section

# Underscores only at a word's edge: GitHub does not emphasise inside words such as tf_privacy.
_SPECIAL = re.compile(r"([\\`*\[\]|~]|(?<!\w)_|_(?!\w))")


def escape(value: object) -> str:
    """Text that Markdown (GitHub's included) shows literally: no HTML, links, emphasis or table breaks."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _SPECIAL.sub(lambda m: "\\" + m.group(0), text)


_num = tables.number_text


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _accuracy(pa: pd.DataFrame, label: str, privacy: str) -> str:
    match = pa[(pa["label"] == label) & (pa["privacy"] == privacy)]
    if match.empty:
        return "—"
    r = match.iloc[0]
    spread = f" ± {r['accuracy_std']:.4f}" if r["seeds"] > 1 else ""
    return f"{r['accuracy']:.4f}{spread} (n={int(r['seeds'])})"


def _value(table: pd.DataFrame, label: str, mode: str, column: str, spec: str, suffix: str = "") -> str:
    match = table[(table["label"] == label) & (table["mode"] == mode)] if not table.empty else table
    return _num(match.iloc[0][column], spec, suffix) if not match.empty else "—"


def _problems(section: Section) -> list[str]:
    bad = section.runs[section.runs["status"] != "ok"]
    if bad.empty:
        return []
    lines = [f"{len(bad)} of {len(section.runs)} runs did not finish ok:"]
    for _, r in bad.iterrows():
        reason = (r["error"] or "").strip().split("\n")[0]
        lines.append(
            f"- {escape(r['label'])} {escape(r['privacy'])} seed {escape(r['seed'])}: "
            f"**{escape(r['status'])}** {escape(reason)}"
        )
    return [*lines, ""]


def _federated_section(section: Section) -> list[str]:
    """A federated workload: one table row per run with clients, noise, final ε, accuracy, clip and s/round."""
    lines = [f"## {escape(section.title)}", "", escape(section.settings()), ""]
    table = section.federated_runs
    with_seed = table["seed"].nunique() > 1
    headers = ["backend:variant", "privacy", *(["seed"] if with_seed else []), "clients/round", "σ"]
    headers += ["ε (PLD)", "ε (RDP)", "test acc", "round", "clip norm", "s/round", "local s/round", "status"]
    lines += [_row(headers), _row(["---"] * len(headers))]
    for _, r in table.iterrows():
        cells = [escape(r["label"]), escape(r["privacy"]), *([escape(r["seed"])] if with_seed else [])]
        cells += [_num(r["clients_per_round"], ".0f"), _num(r["noise_multiplier"], ".4g")]
        cells += [escape(tables.epsilon_text(r["epsilon"])), escape(tables.epsilon_text(r["epsilon_rdp"]))]
        cells += [_num(r["accuracy"], ".4f"), _num(r["accuracy_round"], ".0f"), _num(r["clip_norm"], ".4g")]
        cells += [_num(r["seconds_per_round"], ".3g"), _num(r["train_seconds_per_round"], ".3g"), escape(r["status"])]
        lines.append(_row(cells))
    lines += [
        "",
        "User-level ε after the last round (∞: no noise); accuracy: the last evaluation round's; clip norm: the "
        "last round's adaptive clip; s/round: median over rounds after the first (whole round; local: the "
        "backend's training alone).",
        "",
    ]
    return lines + _problems(section)


def _section(section: Section) -> list[str]:
    if section.federated:
        return _federated_section(section)
    lines = [f"## {escape(section.title)}", "", escape(section.settings()), ""]
    if section.shuffled:
        lines += [
            f"> **Note:** shuffle-sampled DP runs ({tables.SHUFFLE_MARK}): their ε assumes Poisson sampling and is "
            "not a guarantee.",
            "",
        ]
    dp_levels = [p for p in section.privacy_order if p != tables.NON_PRIVATE]
    pa = section.privacy_accuracy
    eps = []
    for level in dp_levels:
        match = pa[pa["privacy"] == level]
        if not match.empty:
            mark = tables.SHUFFLE_MARK if bool(match["poisson_assumed"].iloc[0]) else ""
            eps.append(
                f"{escape(level)}: ε {match['epsilon'].iloc[0]:.3f}{mark} (PLD), "
                f"{match['epsilon_rdp'].iloc[0]:.3f}{mark} (RDP)"
            )
    headers = ["backend:variant", "non-private acc", *(f"{escape(p)} acc" for p in dp_levels)]
    headers += ["DP s/epoch", "non-private s/epoch", "DP overhead", "DP vs fastest", "DP peak MB"]
    lines += [_row(headers), _row(["---"] * len(headers))]
    for label in sorted(section.runs["label"].unique()):
        cells = [escape(label), _accuracy(pa, label, tables.NON_PRIVATE)]
        cells += [_accuracy(pa, label, p) for p in dp_levels]
        cells += [
            _value(section.speed, label, tables.DP, "seconds", ".3g"),
            _value(section.speed, label, tables.NONDP, "seconds", ".3g"),
            _value(section.speed, label, tables.DP, "dp_overhead", ".2f", "×"),
            _value(section.speed, label, tables.DP, "vs_fastest", ".2f", "×"),
            _value(section.memory, label, tables.DP, "peak_memory_mb", ".0f"),
        ]
        lines.append(_row(cells))
    lines.append("")
    if eps:
        lines += ["Final " + "; ".join(eps) + ".", ""]
    return lines + _problems(section) + _measured_privacy(section)


def _measured_privacy(section: Section) -> list[str]:
    """The audit records of the workload (`bench audit`), if any."""
    rows = privacy.audit_rows(section.audits)
    if not rows:
        return []
    lines = [
        "### Measured privacy",
        "",
        escape(privacy.NOTE),
        "",
        _row(privacy.HEADERS),
        _row(["---"] * len(privacy.HEADERS)),
    ]
    lines += [_row([escape(c) for c in cells]) for cells in rows]
    return [*lines, ""]


def render(report: Report) -> str:
    counts = ", ".join(f"{n} {escape(s)}" for s, n in sorted(report.status_counts.items()))
    lines = [
        "# DP-SGD benchmark report",
        "",
        f"Suites: {escape(', '.join(report.suites))}. {len(report.runs)} runs ({counts}) "
        f"from `{str(report.results.source).replace('`', '')}`.",
        "",
    ]
    if report.results.skipped:
        lines.append(f"{len(report.results.skipped)} result files could not be read:")
        lines += [f"- {escape(s.path)}: {escape(s.reason)}" for s in report.results.skipped]
        lines.append("")
    for section in report.sections:
        lines += _section(section)
    lines += ["Seconds per epoch: median over epochs after the first; accuracy: final test accuracy, mean ± std.", ""]
    lines.append("Provenance:")
    for _, r in report.provenance.iterrows():
        lines.append(
            f"- {escape(r['label'])}: {escape(r['versions'])}; Python {escape(r['python'])}; "
            f"{escape(r['hardware'])}, {escape(r['threads'])} threads; commit {escape(r['git_commit'])}"
        )
    return "\n".join(lines) + "\n"
