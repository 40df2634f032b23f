"""`bench report` on federated (DP-FedAvg) workloads beside a DP-SGD one: sections, labels, charts and tables."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
from report_rows import fed_accuracy, fed_clip, fed_seconds, federated_rows, frame, run_rows, write
from test_report import sweep

from bench.report import make_report, render, tables

HOSTILE = '<script>alert("w")</script>'
NO_NOISE = "σ=0 · 50/round"
RDP_2 = "σ=1.2 · 120/round (ε=2 target)"
PLD_2 = "σ=0.95 · 95/round (ε=2 target)"


def federated_sweep(workload: str = "fedavg") -> list[list[dict]]:
    """jax at noise 0, 0.5 and two ε=2 calibrations (RDP: 120 clients, PLD: 95); opacus at 0.5, and at 1.0 timed out."""
    return [
        federated_rows(run_id="f-j-0", noise_multiplier=0.0, top=0.85, workload=workload),
        federated_rows(run_id="f-j-05", noise_multiplier=0.5, final_epsilon=6.0, workload=workload),
        federated_rows(
            run_id="f-j-rdp",
            noise_multiplier=1.2,
            target_epsilon=2.0,
            clients_per_round=120,
            final_epsilon=1.7,
            top=0.75,
            workload=workload,
        ),
        federated_rows(
            run_id="f-j-pld",
            noise_multiplier=0.95,
            target_epsilon=2.0,
            clients_per_round=95,
            final_epsilon=2.0,
            top=0.74,
            workload=workload,
        ),
        federated_rows(
            run_id="f-o-05", backend="opacus", variant="ghost", noise_multiplier=0.5, final_epsilon=6.0, top=0.79
        ),
        federated_rows(
            run_id="f-o-1",
            backend="opacus",
            variant="ghost",
            noise_multiplier=1.0,
            done=7,
            status="timeout",
            error="run exceeded its time limit after 7 of 20 rounds",
        ),
    ]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One results folder with the federated sweep and the DP-SGD sweep: the report, its HTML and Markdown."""
    folder = tmp_path_factory.mktemp("mixed")
    write(folder, *federated_sweep(), *sweep())
    report = make_report(folder)
    return report, render(report, "html"), render(report, "md")


@pytest.fixture(scope="module")
def fed(rendered):
    report, _, _ = rendered
    return next(s for s in report.sections if s.federated)


def _charts(page: str) -> dict[str, list[dict]]:
    """Chart specs on a page by chart name (in page order)."""
    names = dict(re.findall(r'class="chart" id="(chart-\d+)" data-chart-name="([^"]+)"', page))
    blocks = re.findall(r'<script type="application/json" data-chart-for="(chart-\d+)">(.*?)</script>', page, re.S)
    out: dict[str, list[dict]] = {}
    for chart_id, spec in blocks:
        out.setdefault(names[chart_id], []).append(json.loads(spec))
    return out


def _data(spec: dict) -> list[dict]:
    return [row for rows in spec.get("datasets", {}).values() for row in rows]


def _section_html(page: str, title_part: str) -> str:
    sections = re.findall(r'<section class="workload[^"]*">.*?</section>', page, re.S)
    return next(s for s in sections if title_part in s)


# --- tables and model --------------------------------------------------------------------------------------------


def test_federated_section_is_recognised_and_centralized_is_not(rendered):
    report, _, _ = rendered
    kinds = {(s.suite, s.workload): s.kind for s in report.sections}
    assert kinds == {("fed", "fedavg"): "federated", ("s", "w"): "centralized"}


def test_settings_line_names_clients_rounds_and_user_level_dp(fed):
    assert fed.settings() == (
        "1024 training examples, 3383 clients, expected 50–120 clients per round, 20 rounds, 1 local epoch, "
        "client batch 32, client sgd, initial clip C=0.1, δ=1e-05, Poisson sampling of clients (user-level DP)"
    )


def test_settings_with_one_clients_per_round():
    rows = frame(federated_rows(run_id="a"), federated_rows(run_id="b", noise_multiplier=1.0))
    from bench.report.model import federated_settings

    text = federated_settings(tables.runs(rows))
    assert "expected 50 clients per round" in text and "–" not in text


def test_privacy_levels_tell_calibrated_runs_apart_and_sort_most_private_first(fed):
    assert fed.privacy_order == [RDP_2, PLD_2, "σ=1 · 50/round", "σ=0.5 · 50/round", NO_NOISE]


def test_federated_non_private_level_and_centralized_levels_unchanged():
    rt = tables.runs(
        frame(
            federated_rows(run_id="np", dp=False, noise_multiplier=None, clients_per_round=40),
            run_rows(run_id="c", target_epsilon=None, noise_multiplier=0.8),
        )
    )
    assert dict(zip(rt["run_id"], rt["privacy"], strict=True)) == {"np": "non-private · 40/round", "c": "σ=0.8"}


def test_federated_table_has_final_values_per_run(fed):
    t = fed.federated_runs.set_index("run_id")
    assert list(fed.federated_runs["privacy"][:2]) == [RDP_2, PLD_2]
    rdp = t.loc["f-j-rdp"]
    assert (rdp["clients_per_round"], rdp["noise_multiplier"]) == (120, 1.2)
    assert rdp["epsilon"] == pytest.approx(1.7) and rdp["epsilon_rdp"] == pytest.approx(1.87)
    assert rdp["accuracy"] == fed_accuracy(20, 0.75) and rdp["accuracy_round"] == 20
    assert rdp["clip_norm"] == fed_clip(20) and rdp["unclipped_fraction"] == 0.5
    assert rdp["seconds_per_round"] == pytest.approx(statistics.median(fed_seconds(r) for r in range(2, 21)))
    assert rdp["train_seconds_per_round"] == pytest.approx(0.8 * rdp["seconds_per_round"])
    assert (rdp["rounds_done"], rdp["rounds"], rdp["status"]) == (20, 20, "ok")
    assert math.isinf(t.loc["f-j-0", "epsilon"]) and math.isinf(t.loc["f-j-0", "epsilon_rdp"])
    stopped = t.loc["f-o-1"]  # timed out after round 7: its last evaluation was round 5
    assert stopped["status"] == "timeout" and stopped["rounds_done"] == 7
    assert stopped["accuracy_round"] == 5 and stopped["accuracy"] == fed_accuracy(5)
    assert stopped["clip_norm"] == fed_clip(7)


def test_round_accuracy_has_only_evaluation_rounds_of_ok_runs(fed):
    curves = fed.round_accuracy
    assert set(curves.groupby(["label", "privacy"])["round"].apply(tuple)) == {(5, 10, 15, 20)}
    assert "σ=1 · 50/round" not in set(curves["privacy"])  # the timed-out run
    assert len(curves.groupby(["label", "privacy"])) == 5


def test_epsilon_text_shows_infinity_and_missing():
    assert tables.epsilon_text(math.inf) == "∞ (no noise)"
    assert tables.epsilon_text(float("nan")) == "—" and tables.epsilon_text(None) == "—"
    assert tables.epsilon_text(1.23456) == "1.235"


# --- HTML --------------------------------------------------------------------------------------------------------


def test_html_federated_charts(rendered):
    _, page, _ = rendered
    section = _section_html(page, "fed / fedavg")
    names = re.findall(r'data-chart-name="([^"]+)"', section)
    assert names == ["round-accuracy", "privacy-accuracy", "epsilon", "clip-norm"]
    assert '<table class="speed">' not in section and "DP overhead" not in section


def test_html_round_accuracy_chart_data_is_eval_rounds_per_level_and_backend(rendered):
    _, page, _ = rendered
    (spec,) = _charts(_section_html(page, "fed / fedavg"))["round-accuracy"]
    rows = _data(spec)
    by_series: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        by_series.setdefault((row["label"], row["privacy"]), []).append(row["round"])
    assert {k: sorted(v) for k, v in by_series.items()} == {
        ("jax:vmap", level): [5, 10, 15, 20] for level in (NO_NOISE, "σ=0.5 · 50/round", RDP_2, PLD_2)
    } | {("opacus:ghost", "σ=0.5 · 50/round"): [5, 10, 15, 20]}
    final = {(r["label"], r["privacy"]): r["accuracy"] for r in rows if r["round"] == 20}
    assert final[("jax:vmap", RDP_2)] == fed_accuracy(20, 0.75)
    text = json.dumps(spec)
    assert '"field": "privacy"' in text and '"facet": {"field": "label"' in text


def test_html_privacy_accuracy_leaves_infinite_epsilon_off_the_axis(rendered):
    _, page, _ = rendered
    section = _section_html(page, "fed / fedavg")
    (spec,) = _charts(section)["privacy-accuracy"]
    layers = {json.dumps(layer.get("mark")): layer for layer in spec["layer"]}
    points = [r for r in _data(spec) if "epsilon" in r]
    assert {r["privacy"] for r in points} == {"σ=0.5 · 50/round", RDP_2, PLD_2}
    assert all(math.isfinite(r["epsilon"]) for r in points)
    (dotted,) = [layer for mark, layer in layers.items() if "[2, 3]" in mark]
    assert [r["privacy"] for r in spec["datasets"][dotted["data"]["name"]]] == [NO_NOISE]
    assert "dotted: ε = ∞" in str(spec["title"])
    assert "σ=0 · 50/round: no noise, so ε = ∞" in section
    (eps,) = _charts(section)["epsilon"]
    assert NO_NOISE not in {r["privacy"] for r in _data(eps)}
    assert '"title": "round"' in json.dumps(eps)


def test_html_federated_table_rows(rendered):
    _, page, _ = rendered
    table = _section_html(page, "fed / fedavg").split('<table class="federated">')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + 6
    row = next(r for r in table.split("<tr>") if "σ=1.2 · 120/round" in r)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[1:] == [
        "σ=1.2 · 120/round (ε=2 target)",
        "120",
        "1.2",
        "1.700",
        "1.870",
        f"{fed_accuracy(20, 0.75):.4f}",
        "20",
        f"{fed_clip(20):.4g}",
        f"{statistics.median(fed_seconds(r) for r in range(2, 21)):.4g}",
        f"{0.8 * statistics.median(fed_seconds(r) for r in range(2, 21)):.4g}",
        "20/20",
        "ok",
    ]
    no_noise = next(r for r in table.split("<tr>") if NO_NOISE in r)
    assert no_noise.count("∞ (no noise)") == 2
    assert "timeout" in table


def test_html_all_runs_table_counts_rounds(rendered):
    _, page, _ = rendered
    runs = page.split('<table class="runs">')[1].split("</table>")[0]
    assert runs.count("20/20 rounds") == 5 and "7/20 rounds" in runs
    assert runs.count("∞ (no noise)") == 2  # PLD and RDP of the noise-0 run


def test_html_escapes_a_hostile_federated_workload_name(tmp_path):
    write(tmp_path, *federated_sweep(workload=HOSTILE)[:2])
    page = render(make_report(tmp_path), "html")
    body = page.split('<script type="module">')[0]
    assert "<script>alert" not in body and "&lt;script&gt;alert(&quot;w&quot;)&lt;/script&gt;" in body
    for spec in _charts(page)["round-accuracy"]:
        assert all(row["workload"] == HOSTILE for row in _data(spec))  # data, drawn as text
    md = render(make_report(tmp_path), "md")
    assert "<script>" not in md and "&lt;script&gt;" in md


# --- Markdown ----------------------------------------------------------------------------------------------------


def test_markdown_federated_table(rendered):
    _, _, md = rendered
    part = md.split("## fed / fedavg")[1].split("## s / w")[0]
    assert "expected 50–120 clients per round" in part and "(user-level DP)" in part
    assert "| backend:variant | privacy | clients/round | σ | ε (PLD) | ε (RDP) |" in part
    seconds = statistics.median(fed_seconds(r) for r in range(2, 21))
    expected = (
        f"| jax:vmap | σ=1.2 · 120/round (ε=2 target) | 120 | 1.2 | 1.700 | 1.870 | {fed_accuracy(20, 0.75):.4f} "
        f"| 20 | {fed_clip(20):.4g} | {seconds:.3g} | {0.8 * seconds:.3g} | ok |"
    )
    assert expected in part
    assert "| jax:vmap | σ=0 · 50/round | 50 | 0 | ∞ (no noise) | ∞ (no noise) |" in part
    assert "**timeout** run exceeded its time limit after 7 of 20 rounds" in part
    assert "DP overhead" not in part


# --- the DP-SGD section beside it ----------------------------------------------------------------------------------


def test_centralized_section_renders_as_without_federated_runs(rendered, tmp_path):
    report, page, md = rendered
    write(tmp_path, *sweep())
    alone = make_report(tmp_path)
    alone_page, alone_md = render(alone, "html"), render(alone, "md")
    assert report.labels == alone.labels  # same series, so the same colour scale

    def centralized(p: str) -> str:
        return re.sub(r"chart-\d+", "chart-N", _section_html(p, "s / w"))

    assert centralized(page) == centralized(alone_page)
    assert (
        md.split("## s / w")[1].split("Seconds per epoch:")[0]
        == alone_md.split("## s / w")[1].split("Seconds per epoch:")[0]
    )
    assert "| jax:vmap | 0.8200 ± 0.0283 (n=2) | 0.7200 ± 0.0283 (n=2) | 5 | 2 | 2.50× | 2.50× | 250 |" in md


def test_federated_section_with_no_finished_round_or_only_noise_0_renders(tmp_path):
    empty = federated_rows(run_id="none", done=0, status="failed", error="ImportError: no backend", seed=1)
    for row in empty:
        row["epoch"] = 0  # what the runner writes for a run without a finished round
    write(tmp_path, empty, federated_rows(run_id="zero", noise_multiplier=0.0))
    report = make_report(tmp_path)
    (section,) = report.sections
    t = section.federated_runs.set_index("run_id")
    assert t.loc["none", "rounds_done"] == 0 and math.isnan(t.loc["none", "accuracy"])
    page = render(report, "html")
    names = re.findall(r'data-chart-name="([^"]+)"', page)
    assert names == ["round-accuracy", "privacy-accuracy", "clip-norm"]  # no finite ε to draw per round
    assert "0/20 rounds" in page and "∞ (no noise)" in page
    md = render(report, "md")
    assert "| jax:vmap | σ=0.5 · 50/round | 1 | 50 | 0.5 | — | — | — | — | — | — | — | failed |" in md
    assert "| jax:vmap | σ=0 · 50/round | 0 | 50 | 0 | ∞ (no noise) | ∞ (no noise) | 0.7850 | 20 |" in md
