"""`bench report`: the tables behind each chart, loading odd result folders, escaping, and the CLI."""

from __future__ import annotations

import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_rows import frame, run_rows, write

from bench.cli import main
from bench.report import make_report, render, tables
from bench.resultset import ResultsError, load_results

EVIL = '<img src=x onerror="alert(1)"></script><script>alert(2)</script>&amp;'


def sweep() -> list[list[dict]]:
    """Two backends, two seeds, non-private and eps 1; opacus has no non-private run; one jax run failed."""
    return [
        run_rows(run_id="j-np-0", dp=False, accuracies=(0.7, 0.80), seconds=(9.0, 1.0), memory=(90, 100)),
        run_rows(run_id="j-np-1", dp=False, seed=1, accuracies=(0.7, 0.84), seconds=(9.0, 3.0), memory=(90, 110)),
        run_rows(run_id="j-dp-0", accuracies=(0.6, 0.70), seconds=(30.0, 4.0), memory=(150, 200)),
        run_rows(run_id="j-dp-1", seed=1, accuracies=(0.6, 0.74), seconds=(30.0, 6.0), memory=(150, 300)),
        run_rows(run_id="j-dp-2", seed=2, accuracies=(), status="failed", error="RuntimeError: boom\nTraceback line"),
        run_rows(
            run_id="o-dp-0",
            backend="opacus",
            variant="ghost",
            accuracies=(0.6, 0.72),
            seconds=(5.0, 2.0),
            epsilons_reported=(0.61, 1.01),
        ),
    ]


@pytest.fixture
def rows():
    return frame(*sweep())


@pytest.fixture
def run_table(rows):
    return tables.runs(rows)


def test_runs_has_one_row_per_run_with_last_epoch_and_reason(run_table):
    assert len(run_table) == 6
    failed = run_table.set_index("run_id").loc["j-dp-2"]
    assert failed["status"] == "failed" and failed["epochs_done"] == 0
    assert failed["error"].startswith("RuntimeError: boom")
    ok = run_table.set_index("run_id").loc["j-dp-1"]
    assert ok["test_accuracy"] == 0.74 and ok["epochs_done"] == 2
    assert ok["seconds_per_epoch"] == 6.0  # epoch 1 (compilation) is not a speed measurement
    assert ok["peak_memory_mb"] == 300
    assert ok["label"] == "jax:vmap" and ok["privacy"] == "ε=1"


def test_privacy_levels_name_what_was_asked_and_sort_non_private_first():
    rt = tables.runs(
        frame(
            run_rows(run_id="a", target_epsilon=8.0),
            run_rows(run_id="b", target_epsilon=None, noise_multiplier=0.8),
            run_rows(run_id="c", dp=False),
            run_rows(run_id="d", target_epsilon=1.0),
        )
    )
    assert list(rt["privacy"]) == ["non-private", "ε=1", "ε=8", "σ=0.8"]


def test_privacy_accuracy_aggregates_ok_runs_over_seeds(run_table):
    pa_table = tables.privacy_accuracy(run_table).set_index(["label", "privacy"])
    jdp = pa_table.loc[("jax:vmap", "ε=1")]
    assert jdp["seeds"] == 2  # the failed seed 2 is not averaged in
    assert jdp["accuracy"] == pytest.approx(0.72)
    assert jdp["accuracy_std"] == pytest.approx(math.sqrt(((0.70 - 0.72) ** 2 + (0.74 - 0.72) ** 2) / 1))
    assert (jdp["accuracy_min"], jdp["accuracy_max"]) == (0.70, 0.74)
    assert jdp["epsilon"] == 1.0 and jdp["epsilon_rdp"] == 1.2
    ref = pa_table.loc[("jax:vmap", "non-private")]
    assert not ref["dp"] and math.isnan(ref["epsilon"]) and ref["accuracy"] == pytest.approx(0.82)
    single = pa_table.loc[("opacus:ghost", "ε=1")]
    assert single["seeds"] == 1 and single["accuracy_std"] == 0.0
    assert ("opacus:ghost", "non-private") not in pa_table.index


def test_privacy_accuracy_marks_shuffle_sampling():
    rt = tables.runs(frame(run_rows(run_id="a", sampling="shuffle"), run_rows(run_id="b", sampling="poisson")))
    marks = tables.privacy_accuracy(rt).set_index("label")["poisson_assumed"]
    assert bool(marks.iloc[0]) is True


def test_speed_pools_epochs_after_the_first_and_computes_ratios(rows, run_table):
    speed = tables.speed(rows, run_table).set_index(["label", "mode"])
    jdp = speed.loc[("jax:vmap", "DP")]
    assert jdp["seconds"] == 5.0 and (jdp["seconds_min"], jdp["seconds_max"]) == (4.0, 6.0)
    assert jdp["measurements"] == 2 and jdp["runs"] == 2
    jnp = speed.loc[("jax:vmap", "non-private")]
    assert jnp["seconds"] == 2.0
    assert jdp["dp_overhead"] == pytest.approx(2.5) and jnp["dp_overhead"] == pytest.approx(2.5)
    odp = speed.loc[("opacus:ghost", "DP")]
    assert odp["vs_fastest"] == 1.0 and jdp["vs_fastest"] == pytest.approx(2.5)
    assert math.isnan(odp["dp_overhead"])  # no non-private opacus run: no ratio, not a made-up one


def test_speed_of_a_single_epoch_run_uses_that_epoch():
    rows = frame(run_rows(run_id="a", accuracies=(0.5,), seconds=(7.0,), memory=(1.0,), epsilons=(1.0,)))
    assert tables.speed(rows, tables.runs(rows))["seconds"].tolist() == [7.0]


def test_memory_is_the_median_over_runs_of_each_runs_peak(run_table):
    mem = tables.memory(run_table).set_index(["label", "mode"])
    assert mem.loc[("jax:vmap", "DP"), "peak_memory_mb"] == 250.0  # peaks 200 and 300
    assert mem.loc[("jax:vmap", "DP"), "dp_overhead"] == pytest.approx(250 / 105)


def test_learning_curves_average_seeds_per_epoch(rows, run_table):
    curves = tables.learning_curves(rows, run_table)
    jnp = curves[(curves["label"] == "jax:vmap") & (curves["privacy"] == "non-private")].set_index("epoch")
    assert jnp.loc[2, "accuracy"] == pytest.approx(0.82) and jnp.loc[2, "seeds"] == 2
    assert jnp.loc[1, "accuracy_min"] == 0.7


def test_epsilon_curves_show_core_accountants_and_backends_own(rows, run_table):
    eps = tables.epsilon_curves(rows, run_table)
    core = eps[eps["label"] == ""]
    assert set(core["accountant"]) == {tables.PLD, tables.RDP}
    assert core[(core["accountant"] == tables.PLD) & (core["epoch"] == 2)]["epsilon"].tolist() == [1.0]
    own = eps[eps["label"] != ""]
    assert own["label"].unique().tolist() == ["opacus:ghost"]  # jax reports no epsilon of its own
    assert own.sort_values("epoch")["epsilon"].tolist() == [0.61, 1.01]


def test_tables_of_an_all_failed_folder_are_empty_not_errors():
    rows = frame(run_rows(run_id="x", accuracies=(), status="oom", error="out of memory"))
    rt = tables.runs(rows)
    assert len(rt) == 1
    for table in (
        tables.privacy_accuracy(rt),
        tables.speed(rows, rt),
        tables.memory(rt),
        tables.learning_curves(rows, rt),
        tables.epsilon_curves(rows, rt),
    ):
        assert table.empty


# --- loading ---------------------------------------------------------------------------------------------------


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ResultsError, match="no result files"):
        load_results(tmp_path)
    with pytest.raises(ResultsError, match="no such file"):
        load_results(tmp_path / "nope")


def test_corrupt_and_newer_files_are_skipped_and_listed(tmp_path):
    write(tmp_path, *sweep()[:2])
    (tmp_path / "s" / "broken.parquet").write_bytes(b"PAR1 not really")
    newer = tmp_path / "s" / "future.parquet"
    pq.write_table(pa.table({"schema_version": [99], "run_id": ["f"], "status": ["ok"]}), newer)
    results = load_results(tmp_path)
    assert len(results.frame["run_id"].unique()) == 2
    reasons = {s.path.name: s.reason for s in results.skipped}
    assert set(reasons) == {"broken.parquet", "future.parquet"}
    assert "newer" in reasons["future.parquet"]


def test_older_schema_without_some_columns_still_reads(tmp_path):
    write(tmp_path, sweep()[0])
    old = pa.table({"run_id": ["old"], "suite": ["s"], "workload": ["w"], "backend": ["jax"], "status": ["failed"]})
    pq.write_table(old, tmp_path / "s" / "old.parquet")
    results = load_results(tmp_path)
    assert set(results.frame["run_id"]) == {"j-np-0", "old"}
    assert "epsilon_reported" in results.frame and not results.skipped
    report = make_report(tmp_path)
    assert "old" in set(report.runs["run_id"])
    render(report, "html")
    render(report, "md")


def test_suite_filter_and_unknown_suite(tmp_path):
    write(tmp_path, run_rows(run_id="a", suite="one"), run_rows(run_id="b", suite="two"))
    assert set(load_results(tmp_path, suite="one").frame["run_id"]) == {"a"}
    with pytest.raises(ResultsError, match="suites with results there: one, two"):
        load_results(tmp_path, suite="three")


def test_logs_and_temporary_files_are_not_results(tmp_path):
    write(tmp_path, run_rows(run_id="a"))
    (tmp_path / "_logs").mkdir()
    (tmp_path / "_logs" / "x.parquet").write_bytes(b"junk")
    (tmp_path / "s" / ".a.parquet.123.tmp").write_bytes(b"junk")
    assert not load_results(tmp_path).skipped


# --- rendering ---------------------------------------------------------------------------------------------------


def _chart_specs(page: str) -> list[dict]:
    blocks = re.findall(r'<script type="application/json" data-chart-for="[^"]+">(.*?)</script>', page, re.S)
    return [json.loads(b) for b in blocks]


def test_html_has_every_chart_and_every_run(tmp_path):
    write(tmp_path, *sweep())
    page = render(make_report(tmp_path), "html")
    count = int(re.search(r'data-chart-count="(\d+)"', page).group(1))
    names = re.findall(r'class="chart" id="chart-\d+" data-chart-name="([^"]+)"', page)
    assert count == len(names) == len(_chart_specs(page))
    assert set(names) == {"privacy-accuracy", "speed", "dp-overhead", "memory", "learning-curves", "epsilon"}
    runs_body = page.split('<table class="runs">')[1].split("</table>")[0]
    assert runs_body.count("<tr>") == 1 + 6  # header and one per run, the failed one included
    assert "RuntimeError: boom" in page and "1 of 6 runs did not finish ok" in page
    assert "Content-Security-Policy" in page and "renderDone" in page


def test_html_and_markdown_escape_suite_names_and_errors(tmp_path):
    write(
        tmp_path,
        run_rows(run_id="a", suite=EVIL, workload=EVIL),
        run_rows(run_id="b", suite=EVIL, workload=EVIL, accuracies=(), status="failed", error=EVIL),
    )
    page = render(make_report(tmp_path), "html")
    body = page.split('<script type="module">')[0]
    assert "<img" not in body and "alert(2)</script>" not in body
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in body
    for spec in _chart_specs(page):  # kept as data, which Vega draws as text
        assert any(row.get("suite") == EVIL for rows in spec["datasets"].values() for row in rows)
    md = render(make_report(tmp_path), "md")
    assert "<img" not in md and "<script>" not in md and "&lt;img" in md


def test_html_shows_the_shuffle_note_only_when_a_dp_run_shuffles(tmp_path):
    write(tmp_path, run_rows(run_id="a", sampling="shuffle"), run_rows(run_id="b", dp=False, sampling="shuffle"))
    page = render(make_report(tmp_path), "html")
    assert "assumes Poisson" in page and "†" in page
    other = tmp_path / "other"
    write(other, run_rows(run_id="a"), run_rows(run_id="b", dp=False, sampling="shuffle"))
    assert "not a proven guarantee" not in render(make_report(other), "html")


def test_one_backend_one_seed_only_non_private(tmp_path):
    write(tmp_path, run_rows(run_id="a", dp=False))
    report = make_report(tmp_path)
    page = render(report, "html")
    names = re.findall(r'data-chart-name="([^"]+)"', page)
    assert "privacy-accuracy" in names and "epsilon" not in names and "dp-overhead" not in names
    assert "| jax:vmap | 0.7000 (n=1) |" in render(report, "md")


def test_markdown_summary_table(tmp_path):
    write(tmp_path, *sweep())
    md = render(make_report(tmp_path), "md")
    assert "| jax:vmap | 0.8200 ± 0.0283 (n=2) | 0.7200 ± 0.0283 (n=2) | 5 | 2 | 2.50× | 2.50× | 250 |" in md
    assert "| opacus:ghost | — | 0.7200 (n=1) | 2 | — | — | 1.00× | 120 |" in md
    assert "**failed** RuntimeError: boom" in md
    assert "Final ε=1: ε 1.000 (PLD), 1.200 (RDP)." in md


# --- CLI --------------------------------------------------------------------------------------------------------


def test_cli_empty_folder_exits_2_with_message(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no result files" in capsys.readouterr().err


def test_cli_writes_html_and_prints_markdown(tmp_path, capsys):
    write(tmp_path / "results", *sweep())
    out = tmp_path / "out" / "r.html"
    assert main(["report", str(tmp_path / "results"), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "results"), "--format", "md", "--suite", "s"]) == 0
    assert capsys.readouterr().out.startswith("# DP-SGD benchmark report")


def test_cli_warns_about_skipped_files(tmp_path, capsys):
    write(tmp_path, run_rows(run_id="a"))
    (tmp_path / "s" / "bad.parquet").write_text("x")
    assert main(["report", str(tmp_path), "--format", "md"]) == 0
    assert "skipped unreadable result file" in capsys.readouterr().err


def test_several_suites_get_their_own_sections_and_colours_stay_fixed(tmp_path):
    write(
        tmp_path,
        run_rows(run_id="a", suite="one"),
        run_rows(run_id="b", suite="two", backend="opacus", variant="ghost"),
        run_rows(run_id="c", suite="two"),
    )
    report = make_report(tmp_path)
    assert [(s.suite, s.workload) for s in report.sections] == [("one", "w"), ("two", "w")]
    page = render(report, "html")
    assert page.count('<section class="workload">') == 2
    scales = [scale for spec in _chart_specs(page) for scale in _color_scales(spec)]
    assert len(scales) >= 2 * 5
    for scale in scales:
        assert scale["domain"] == ["jax:vmap", "opacus:ghost"]  # the report's series, not the chart's


def _color_scales(node: object) -> list[dict]:
    found = []
    if isinstance(node, dict):
        if (
            "scale" in node
            and isinstance(node["scale"], dict)
            and "domain" in node["scale"]
            and node.get("field") == "label"
        ):
            found.append(node["scale"])
        for value in node.values():
            found += _color_scales(value)
    elif isinstance(node, list):
        for value in node:
            found += _color_scales(value)
    return found
