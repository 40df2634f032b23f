"""One self-contained HTML page: tables escaped here, charts as Vega-Lite specs rendered by inlined JavaScript.

Every string from results (suite names, errors, versions) goes through `html.escape` or into a JSON script
block with `<`, `>` and `&` escaped; Vega draws chart text as SVG text and its tooltip handler escapes HTML.
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Iterable

import altair as alt
import pandas as pd

from bench.report import charts, privacy, tables
from bench.report.model import Report, Section

RENDER_SNIPPET = """
const blocks = document.querySelectorAll('script[type="application/json"][data-chart-for]');
const jobs = Array.from(blocks, (block) => {
  const target = document.getElementById(block.dataset.chartFor);
  return vegaEmbed(target, JSON.parse(block.textContent), {renderer: "svg", actions: false})
    .then(() => { target.dataset.rendered = "true"; })
    .catch((err) => {
      target.dataset.renderError = String(err);
      target.textContent = "This chart failed to render: " + err;
      console.error("chart " + target.id + " failed to render:", err);
    });
});
Promise.allSettled(jobs).then(() => { document.body.dataset.renderDone = "true"; });
"""

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; color: #222; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 40px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta, .settings { color: #555; }
.note { background: #fff6d6; border-left: 4px solid #e6b800; padding: 8px 12px; margin: 12px 0; }
.problems { background: #fdecea; border-left: 4px solid #d93025; padding: 8px 12px; margin: 12px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.chart { min-height: 40px; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; }
th, td { border-bottom: 1px solid #e5e5e5; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f6f6; position: sticky; top: 0; }
.status-ok { color: #137333; } .status-failed, .status-oom, .status-timeout, .status-diverged { color: #b3261e; }
.status-unsupported, .status-interrupted { color: #8a5a00; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
details summary { cursor: pointer; } pre { white-space: pre-wrap; max-width: 700px; margin: 4px 0; }
"""

# Nothing on the page may reach the network; Vega compiles its expressions with Function(), hence unsafe-eval.
CSP = "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:"

SHUFFLE_NOTE = (
    "Some DP runs here use shuffle sampling (fixed-size batches from a shuffled epoch). Their ε is computed "
    "as if batches were Poisson-sampled, which is what the accountants assume; it is not a proven guarantee "
    "for shuffling (Chua et al. 2024, “How Private are DP-SGD Implementations?”). They are marked † and "
    "drawn with a different point shape."
)

METHODS = (
    "Seconds per epoch: the median of the training-loop time of every epoch after the first (the first includes "
    "tracing and compilation; with one epoch, that epoch), pooled over seeds and, for DP, over privacy levels. "
    "DP overhead: DP / non-private seconds per epoch of the same backend/variant in the same section. "
    "vs fastest: a series' time over the fastest series of the same mode in the section. "
    "ε: the core's PLD accountant for the sampling rate, noise multiplier and steps of the run (the RDP figure and "
    "each backend's own accountant are shown beside it). Accuracy: final test accuracy, mean and spread over seeds. "
    "Only runs with status ok enter the charts; every run, whatever its status, is in the table of runs."
)


FEDERATED_METHODS = (
    "Federated workload (DP-FedAvg, one result row per round): ε is user-level, from the core's PLD accountant "
    "(RDP beside it) over the rounds so far, with Poisson sampling of clients at rate expected clients per round / "
    "clients; noise 0 gives ε = ∞. Test accuracy is measured on evaluation rounds only; the final one is the last "
    "evaluation's. Clip norm: the adaptive clip norm of the last round. Seconds per round: the median over rounds "
    "after the first of the whole round (local training of the sampled clients, aggregation, noise, server update); "
    "local training: the backend's part alone. There is no DP / non-private per-epoch comparison here."
)


@functools.cache
def _vega_bundle() -> str:
    import vl_convert

    # Closing tags inside the inlined library would end its <script> element early.
    return vl_convert.javascript_bundle(RENDER_SNIPPET).replace("</script", "<\\/script")


def _json_for_script(obj: object) -> str:
    text = json.dumps(obj, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _e(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return html.escape(str(value), quote=True)


def _num(value: object, spec: str = ".4g", suffix: str = "") -> str:
    return _e(tables.number_text(value, spec, suffix))


class _Charts:
    """Numbers each chart container and keeps its spec for the page's JSON blocks."""

    def __init__(self) -> None:
        self.count = 0

    def embed(self, chart: alt.TopLevelMixin, name: str) -> str:
        self.count += 1
        chart_id = f"chart-{self.count}"
        spec = _json_for_script(chart.to_dict())
        return (
            f'<div class="chart" id="{chart_id}" data-chart-name="{_e(name)}"></div>\n'
            f'<script type="application/json" data-chart-for="{chart_id}">{spec}</script>'
        )


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _td(text: str, numeric: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if numeric else "", cls) if c)
    return f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>"


def _swatch(label: str, colors: dict[str, str]) -> str:
    return f'<span class="swatch" style="background:{colors.get(label, "#999")}"></span>{_e(label)}'


def _accuracy(run: pd.Series, value: object) -> str:
    """A run's final test accuracy, only if it ended ok: a diverged, failed or stopped run has no final accuracy
    (what it measured before it ended is in no table or chart)."""
    return _num(value, ".4f") if run["status"] == "ok" else "—"


def _reason(error: str) -> str:
    if not error:
        return ""
    first, _, rest = error.strip().partition("\n")
    if not rest.strip():
        return _e(first)
    return f"<details><summary>{_e(first)}</summary><pre>{_e(error)}</pre></details>"


def _speed_table(section: Section, colors: dict[str, str]) -> str:
    speed = section.speed.set_index(["label", "mode"]) if not section.speed.empty else None
    mem = section.memory.set_index(["label", "mode"]) if not section.memory.empty else None

    def get(table: pd.DataFrame | None, lab: str, mode: str, col: str) -> object:
        if table is None or (lab, mode) not in table.index:
            return math.nan
        return table.loc[(lab, mode), col]

    rows = []
    for lab in sorted(section.runs["label"].unique()):
        dp, np_ = tables.DP, tables.NONDP
        rows.append(
            [
                _td(_swatch(lab, colors)),
                _td(_num(get(speed, lab, dp, "seconds")), True),
                _td(_num(get(speed, lab, np_, "seconds")), True),
                _td(_num(get(speed, lab, dp, "dp_overhead"), ".2f", "×"), True),
                _td(_num(get(speed, lab, dp, "vs_fastest"), ".2f", "×"), True),
                _td(_num(get(speed, lab, np_, "vs_fastest"), ".2f", "×"), True),
                _td(_num(get(mem, lab, dp, "peak_memory_mb"), ".0f"), True),
                _td(_num(get(mem, lab, np_, "peak_memory_mb"), ".0f"), True),
            ]
        )
    headers = [
        "backend:variant",
        "DP s/epoch",
        "non-private s/epoch",
        "DP overhead",
        "DP vs fastest DP",
        "non-private vs fastest",
        "DP peak MB",
        "non-private peak MB",
    ]
    return _table(headers, rows, "speed")


def _problems(section: Section) -> str:
    bad = section.runs[section.runs["status"] != "ok"]
    if bad.empty:
        return ""
    items = "".join(
        f"<li>{_e(r['label'])} {_e(r['privacy'])} seed {_e(r['seed'])}: "
        f'<span class="status-{_e(r["status"])}">{_e(r["status"])}</span> {_reason(r["error"])}</li>'
        for _, r in bad.iterrows()
    )
    return (
        f'<div class="problems">{len(bad)} of {len(section.runs)} runs did not finish ok and are left out of '
        f"the charts (all runs are in the table at the end):<ul>{items}</ul></div>"
    )


def _seeds_vary(table: pd.DataFrame) -> bool:
    return table["seed"].nunique() > 1


def _federated_table(section: Section, colors: dict[str, str]) -> str:
    """One row per federated run: clients, noise, final ε, accuracy and clip norm, seconds per round, status."""
    table = section.federated_runs
    with_seed = _seeds_vary(table)
    rows = []
    for _, r in table.iterrows():
        status = _e(r["status"])
        rows.append(
            [
                _td(_swatch(r["label"], colors)),
                _td(_e(r["privacy"])),
                *([_td(_e(r["seed"]), True)] if with_seed else []),
                _td(_num(r["clients_per_round"], ".0f"), True),
                _td(_num(r["noise_multiplier"], ".4g"), True),
                _td(_e(tables.epsilon_text(r["epsilon"])), True),
                _td(_e(tables.epsilon_text(r["epsilon_rdp"])), True),
                _td(_accuracy(r, r["accuracy"]), True),
                _td(_num(r["accuracy_round"], ".0f"), True),
                _td(_num(r["clip_norm"], ".4g"), True),
                _td(_num(r["seconds_per_round"]), True),
                _td(_num(r["train_seconds_per_round"]), True),
                _td(f"{int(r['rounds_done'])}/{_num(r['rounds'], '.0f')}", True),
                _td(status, cls=f"status-{status}"),
            ]
        )
    headers = ["backend:variant", "privacy", *(["seed"] if with_seed else []), "clients/round", "σ"]
    headers += ["final ε (PLD)", "final ε (RDP)", "final test accuracy", "at round", "final clip norm"]
    headers += ["s/round", "local training s/round", "rounds", "status"]
    return _table(headers, rows, "federated")


def _unbounded_levels(section: Section) -> list[str]:
    """Privacy levels of DP runs whose final ε is infinite (noise 0)."""
    runs = section.federated_runs
    infinite = runs["dp"].astype(bool) & runs["epsilon"].astype(float).map(math.isinf)
    return list(dict.fromkeys(runs[infinite]["privacy"]))


def _federated_section(section: Section, scale: alt.Scale, colors: dict[str, str], out: _Charts) -> str:
    """A federated workload: accuracy per round, privacy vs accuracy, ε and clip norm per round, and its runs."""
    unbounded = _unbounded_levels(section)
    parts = [
        f'<section class="workload federated"><h2>{_e(section.title)}</h2>',
        f'<p class="settings">{_e(section.settings())}</p>',
        f'<p class="meta">{_e(FEDERATED_METHODS)}</p>',
        _problems(section),
    ]
    if unbounded:
        levels = ", ".join(unbounded)
        note = f"{levels}: no noise, so ε = ∞ (no privacy). Left off the ε axis; dotted line at its accuracy."
        parts.append(f'<div class="note">{_e(note)}</div>')
    blocks = []
    if not section.round_accuracy.empty:
        chart = charts.round_accuracy(section.round_accuracy, section.privacy_order)
        blocks.append(out.embed(chart, "round-accuracy"))
    if not section.privacy_accuracy.empty:
        title = "Privacy vs accuracy (dashed: non-private" + ("; dotted: ε = ∞, no noise)" if unbounded else ")")
        blocks.append(out.embed(charts.privacy_accuracy(section.privacy_accuracy, scale, title), "privacy-accuracy"))
    if not section.epsilon_curves.empty and not charts.infinite_epsilon(section.epsilon_curves).all():
        chart = charts.epsilon_curves(section.epsilon_curves, scale, section.privacy_order, step="round")
        blocks.append(out.embed(chart, "epsilon"))
    if not section.clip_curves.empty:
        blocks.append(out.embed(charts.clip_curves(section.clip_curves, section.privacy_order), "clip-norm"))
    if blocks:
        parts.append('<div class="charts">' + "\n".join(blocks) + "</div>")
    else:
        parts.append('<p class="problems">No run in this workload finished ok, so there is nothing to chart.</p>')
    parts += [_federated_table(section, colors), "</section>"]
    return "\n".join(p for p in parts if p)


def _section(section: Section, scale: alt.Scale, colors: dict[str, str], out: _Charts) -> str:
    if section.federated:
        return _federated_section(section, scale, colors, out)
    parts = [
        f'<section class="workload"><h2>{_e(section.title)}</h2>',
        f'<p class="settings">{_e(section.settings())}</p>',
    ]
    if section.shuffled:
        parts.append(f'<div class="note">{_e(SHUFFLE_NOTE)}</div>')
    parts.append(_problems(section))
    blocks = []
    if not section.privacy_accuracy.empty:
        title = "Privacy vs accuracy (dashed: non-private)"
        blocks.append(out.embed(charts.privacy_accuracy(section.privacy_accuracy, scale, title), "privacy-accuracy"))
    if not section.speed.empty:
        blocks.append(out.embed(charts.speed(section.speed, scale), "speed"))
        if section.speed["dp_overhead"].notna().any():
            blocks.append(out.embed(charts.overhead(section.speed, scale), "dp-overhead"))
    if not section.memory.empty:
        blocks.append(out.embed(charts.memory(section.memory, scale), "memory"))
    if not section.learning_curves.empty:
        chart = charts.learning_curves(section.learning_curves, scale, section.privacy_order)
        blocks.append(out.embed(chart, "learning-curves"))
    if not section.epsilon_curves.empty:
        blocks.append(out.embed(charts.epsilon_curves(section.epsilon_curves, scale, section.privacy_order), "epsilon"))
    if blocks:
        parts.append('<div class="charts">' + "\n".join(blocks) + "</div>")
    else:
        parts.append('<p class="problems">No run in this workload finished ok, so there is nothing to chart.</p>')
    parts.append(_speed_table(section, colors))
    parts.append(_measured_privacy(section))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _measured_privacy(section: Section) -> str:
    """The audit records of the workload (`bench audit`), if any."""
    rows = privacy.audit_rows(section.audits)
    if not rows:
        return ""
    body = [[_td(_e(c), numeric=2 <= i <= 7) for i, c in enumerate(cells)] for cells in rows]
    return (
        '<h3>Measured privacy</h3><p class="settings">'
        + _e(privacy.NOTE)
        + "</p>"
        + _table(privacy.HEADERS, body, "audits")
    )


def _progress(run: pd.Series) -> str:
    """Epochs done of those planned; for a federated run, rounds."""
    if tables.is_federated(run):
        return f"{int(run['epochs_done'])}/{_num(run.get('rounds'), '.0f')} rounds"
    return f"{int(run['epochs_done'])}/{_num(run['epochs'], '.0f')}"


def _runs_table(report: Report, colors: dict[str, str]) -> str:
    rows = []
    for _, r in report.runs.iterrows():
        shuffled = bool(r["dp"]) and r["sampling"] == "shuffle" and not tables.is_federated(r)
        mark = f'<span title="ε assumes Poisson sampling">{tables.SHUFFLE_MARK}</span>' if shuffled else ""
        status = _e(r["status"])
        rows.append(
            [
                _td(_e(r["suite"])),
                _td(_e(r["workload"])),
                _td(_swatch(r["label"], colors)),
                _td(_e(r["privacy"])),
                _td(_e(r["seed"]), True),
                _td(status, cls=f"status-{status}"),
                _td(_progress(r), True),
                _td(_accuracy(r, r["test_accuracy"]), True),
                _td(_e(tables.epsilon_text(r["epsilon"])) + mark, True),
                _td(_e(tables.epsilon_text(r["epsilon_rdp"])) + mark, True),
                _td(_num(r["epsilon_reported"], ".3f") + (mark if pd.notna(r["epsilon_reported"]) else ""), True),
                _td(_num(r["seconds_per_epoch"]), True),
                _td(_num(r["peak_memory_mb"], ".0f"), True),
                _td(_reason(r["error"])),
                _td(f"<code>{_e(r['run_id'])}</code>"),
            ]
        )
    headers = [
        "suite",
        "workload",
        "backend:variant",
        "privacy",
        "seed",
        "status",
        "epochs",
        "test accuracy",
        "ε (PLD)",
        "ε (RDP)",
        "ε (backend)",
        "s/epoch",
        "peak MB",
        "reason",
        "run id",
    ]
    return _table(headers, rows, "runs")


def _provenance(report: Report) -> str:
    rows = [
        [
            _td(_e(r["label"])),
            _td(_e(r["versions"])),
            _td(_e(r["python"])),
            _td(_e(r["hardware"])),
            _td(_e(r["threads"])),
            _td(_e(r["git_commit"])),
            _td(_e(_when(r["started"]))),
            _td(_e(_when(r["finished"]))),
            _td(_e(r["runs"]), True),
        ]
        for _, r in report.provenance.iterrows()
    ]
    headers = [
        "backend:variant",
        "versions",
        "python",
        "hardware",
        "threads",
        "commit",
        "first start",
        "last end",
        "runs",
    ]
    return _table(headers, rows, "provenance")


def _when(value: object) -> str:
    if value is None or pd.isna(value):
        return ""
    return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M UTC")


def _header(report: Report) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.status_counts.items()))
    res = report.results
    parts = [
        "<h1>DP-SGD benchmark report</h1>",
        f'<p class="meta">Suites: {_e(", ".join(report.suites))}. {len(report.runs)} runs ({_e(counts)}) from '
        f"{res.files} result files in <code>{_e(res.source)}</code>. Generated {_e(_when(report.generated_at))}.</p>",
    ]
    if res.skipped:
        items = "".join(f"<li><code>{_e(s.path)}</code>: {_e(s.reason)}</li>" for s in res.skipped)
        parts.append(f'<div class="problems">{len(res.skipped)} result files could not be read:<ul>{items}</ul></div>')
    parts.append(f'<p class="meta">{_e(METHODS)}</p>')
    return "\n".join(parts)


def render(report: Report) -> str:
    """The whole page as a string."""
    scale = charts.color_scale(report.labels)
    colors = dict(zip(report.labels, scale.range, strict=True))
    out = _Charts()
    body = [_header(report)]
    body += [_section(s, scale, colors, out) for s in report.sections]
    body += ["<h2>All runs</h2>", _runs_table(report, colors)]
    body += ["<h2>Provenance</h2>", _provenance(report)]
    title = f"DP-SGD benchmark: {', '.join(report.suites)}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        f"<style>{CSS}</style></head>\n"
        f'<body data-chart-count="{out.count}">\n' + "\n".join(body) + "\n"
        f'<script type="module">{_vega_bundle()}</script>\n'
        "</body></html>\n"
    )
