"""`bench speed`: the speed table's values and ratios, missing partners, failed runs, targets and the CLI."""

from __future__ import annotations

import math

import pytest
from report_rows import frame, run_rows, write

from bench.cli import main
from bench.report import speed, tables


def with_core(run: list[dict], shares: tuple[float, ...]) -> list[dict]:
    """The run with `train_seconds` = (1 - share) of each epoch's `epoch_seconds`: the rest is the core's work."""
    return [{**row, "train_seconds": row["epoch_seconds"] * (1 - s)} for row, s in zip(run, shares, strict=True)]


def sweep() -> list[list[dict]]:
    """jax:bk (DP and non-private, 2 seeds DP), jax:vmap, opacus:ghost; tf_privacy:fast has no non-private run;
    opacus:hooks failed. Epoch 1 compiles and is never timed."""
    return [
        with_core(run_rows(run_id="bk-dp-0", variant="bk", seconds=(50.0, 1.0), memory=(100, 120)), (0.5, 0.02)),
        with_core(run_rows(run_id="bk-dp-1", variant="bk", seed=1, seconds=(50.0, 1.2)), (0.5, 0.02)),
        with_core(
            run_rows(run_id="bk-np-0", variant="bk", dp=False, seconds=(50.0, 1.0), memory=(90, 100)), (0.5, 0.04)
        ),
        run_rows(run_id="vmap-dp-0", seconds=(50.0, 4.0), memory=(300, 400)),
        run_rows(run_id="vmap-np-0", dp=False, seconds=(50.0, 0.8), memory=(90, 100)),
        run_rows(run_id="ghost-dp-0", backend="opacus", variant="ghost", seconds=(9.0, 2.0), memory=(200, 250)),
        run_rows(run_id="ghost-np-0", backend="opacus", variant="ghost", dp=False, seconds=(9.0, 0.5)),
        run_rows(run_id="fast-dp-0", backend="tf_privacy", variant="fast", seconds=(9.0, 3.0)),
        run_rows(
            run_id="hooks-dp-0",
            backend="opacus",
            variant="hooks",
            accuracies=(),
            status="oom",
            error="worker used 9.0 GiB\nTraceback",
        ),
    ]


@pytest.fixture
def report() -> speed.SpeedReport:
    return speed.build(frame(*sweep()), "jax:bk")


@pytest.fixture
def table(report) -> dict[str, dict]:
    (section,) = report.sections
    return section.table.set_index("label").to_dict("index")


def test_seconds_and_memory_use_the_reports_definitions(table):
    bk = table["jax:bk"]
    assert bk["dp_seconds"] == pytest.approx(1.1)  # median of the epoch-2 times 1.0 and 1.2, epoch 1 left out
    assert bk["np_seconds"] == pytest.approx(1.0)
    assert bk["dp_peak_mb"] == 120 and bk["np_peak_mb"] == 100


def test_ratios_are_computed_within_the_section(table):
    bk, vmap, ghost = table["jax:bk"], table["jax:vmap"], table["opacus:ghost"]
    assert bk["dp_overhead"] == pytest.approx(1.1 / 1.0)
    assert vmap["dp_overhead"] == pytest.approx(4.0 / 0.8)
    assert bk["dp_vs_fastest_dp"] == pytest.approx(1.0)  # jax:bk is the fastest DP (1.1 s)
    assert ghost["dp_vs_fastest_dp"] == pytest.approx(2.0 / 1.1)
    assert vmap["dp_vs_fastest_np"] == pytest.approx(4.0 / 0.5)  # the floor: opacus:ghost non-private, 0.5 s
    assert bk["dp_vs_fastest_np"] == pytest.approx(1.1 / 0.5)
    assert bk["memory_ratio"] == pytest.approx(1.2)
    assert vmap["memory_ratio"] == pytest.approx(4.0)


def test_core_share_pools_timed_epochs_of_dp_and_non_private_runs(table):
    assert table["jax:bk"]["core_share"] == pytest.approx(0.02)  # median of 0.02, 0.02 and 0.04; epoch 1 left out
    assert table["jax:vmap"]["core_share"] == 0.0  # train_seconds == epoch_seconds


def test_missing_partner_gives_nan_and_a_dash(report, table):
    fast = table["tf_privacy:fast"]
    assert fast["dp_seconds"] == 3.0 and fast["dp_vs_fastest_dp"] == pytest.approx(3.0 / 1.1)
    for column in ("np_seconds", "dp_overhead", "np_peak_mb", "memory_ratio"):
        assert math.isnan(fast[column]), column
    md = speed.render_speed(report)
    assert "| tf_privacy:fast | 3.00 | — | — | 2.73× | 6.00× | 120 | — | — | 0.0% |" in md


def test_failed_runs_do_not_count_and_are_listed(report, table):
    hooks = table["opacus:hooks"]
    assert all(math.isnan(hooks[c]) for c in ("dp_seconds", "np_seconds", "dp_peak_mb", "core_share"))
    (section,) = report.sections
    assert section.failed.to_dict("records") == [
        {"label": "opacus:hooks", "privacy": "ε=1", "status": "oom", "reason": "worker used 9.0 GiB"}
    ]
    assert "- opacus:hooks ε=1: **oom** worker used 9.0 GiB\n" in speed.render_speed(report)


def test_a_run_that_ended_badly_after_some_epochs_does_not_count():
    rows = frame(
        with_core(run_rows(run_id="ok", variant="bk", seconds=(9.0, 1.0), memory=(10, 20)), (0.5, 0.01)),
        with_core(
            run_rows(run_id="slow", variant="bk", seed=1, seconds=(9.0, 50.0), memory=(10, 999), status="timeout"),
            (0.5, 0.9),
        ),
    )
    (section,) = speed.build(rows, "jax:bk").sections
    bk = section.table.set_index("label").loc["jax:bk"]
    assert (bk["dp_seconds"], bk["dp_peak_mb"]) == (1.0, 20)
    assert bk["core_share"] == pytest.approx(0.01)
    assert section.failed["status"].tolist() == ["timeout"]


def test_rows_sort_by_dp_seconds_with_nan_last(report):
    (section,) = report.sections
    assert list(section.table["label"]) == ["jax:bk", "opacus:ghost", "tf_privacy:fast", "jax:vmap", "opacus:hooks"]
    assert list(section.table.columns) == speed.COLUMNS


def test_markdown_table_formats(report):
    md = speed.render_speed(report)
    lines = md.splitlines()
    assert lines[0] == "### s / w"
    assert lines[2] == "dataset synthetic, model mlp, expected batch 128, 2 epochs"
    assert lines[4].startswith("| backend:variant | DP s/epoch | non-private s/epoch | DP / non-private |")
    assert lines[6] == "| jax:bk | 1.10 | 1.00 | 1.10× | 1.00× | 2.20× | 120 | 100 | 1.20× | 2.0% |"
    assert lines[-1].startswith("Seconds per epoch: median over the epochs after the first")


def test_targets_of_the_checked_label(report):
    (section,) = report.sections
    results = {r.target.name: r for r in section.targets}
    assert [r.target.name for r in section.targets] == [t.name for t in speed.TARGETS]
    assert results["dp_overhead"].measured == pytest.approx(1.1) and results["dp_overhead"].status == speed.MET
    # other backends' fastest DP: opacus:ghost (2.0 s); jax:vmap is the same backend and does not count
    assert results["dp_vs_fastest_other_dp"].measured == pytest.approx(1.1 / 2.0)
    assert results["dp_vs_fastest_other_dp"].status == speed.MET
    assert results["dp_vs_fastest_np"].measured == pytest.approx(2.2)
    assert results["dp_vs_fastest_np"].status == speed.MISSED
    assert results["memory_ratio"].status == speed.MET and results["core_share"].status == speed.MET
    assert not report.passed
    md = speed.render_speed(report)
    assert "| dp_vs_fastest_np: DP / the fastest non-private of any backend/variant | ≤ 1.50× | 2.20× | missed |" in md
    assert "| core_share: the core's own per-step work as a share of the epoch | < 5.0% | 2.0% | met |" in md


def test_targets_without_a_partner_or_another_backend_are_n_a():
    rows = frame(run_rows(run_id="a", variant="bk"), run_rows(run_id="b", variant="vmap"))
    (section,) = speed.build(rows, "jax:bk").sections
    status = {r.target.name: r.status for r in section.targets}
    assert status == {
        "dp_overhead": speed.NA,  # no non-private run
        "dp_vs_fastest_other_dp": speed.NA,  # jax:vmap is the same backend
        "dp_vs_fastest_np": speed.NA,
        "memory_ratio": speed.NA,
        "core_share": speed.MET,
    }
    assert all(math.isnan(r.measured) for r in section.targets if r.status == speed.NA)


def test_a_label_absent_from_a_section_has_every_target_n_a():
    rows = frame(run_rows(run_id="a", variant="bk", workload="one"), run_rows(run_id="b", workload="two"))
    report = speed.build(rows, "jax:bk")
    second = report.sections[1]
    assert second.workload == "two" and {r.status for r in second.targets} == {speed.NA}
    assert not report.passed


@pytest.mark.parametrize(
    "seconds, text",
    [(1.0, "1.00"), (0.05, "0.0500"), (12.34, "12.3"), (9.996, "10.0"), (123.4, "123"), (1234.5, "1230"), (0.0, "0")]
    + [(math.nan, "—"), (None, "—")],
)
def test_seconds_have_three_significant_digits(seconds, text):
    assert speed.fmt_seconds(seconds) == text


def test_other_formats():
    assert (speed.fmt_ratio(1.234), speed.fmt_mb(1234.6), speed.fmt_share(0.01234)) == ("1.23×", "1235", "1.2%")
    assert {speed.fmt_ratio(math.nan), speed.fmt_mb(None), speed.fmt_share(math.nan)} == {"—"}


@pytest.mark.parametrize(
    "target, value, status",
    [
        (speed.Target("x", "", 1.2), 1.2, speed.MET),
        (speed.Target("x", "", 1.2), 1.2001, speed.MISSED),
        (speed.Target("x", "", 0.05, strict=True), 0.05, speed.MISSED),
        (speed.Target("x", "", 0.05, strict=True), 0.0499, speed.MET),
        (speed.Target("x", "", 1.0), math.nan, speed.NA),
    ],
)
def test_target_status(target, value, status):
    assert target.status(value) == status


def test_default_label_is_jaxs_default_variant():
    from bench.backend import get_backend_info

    assert speed.default_label() == f"jax:{get_backend_info('jax').default_variant}"


def test_text_is_escaped():
    evil = "<b>x</b>|*y*"
    rows = frame(run_rows(run_id="a", variant="bk", workload=evil, status="failed", accuracies=(), error=evil))
    md = speed.render_speed(speed.build(rows, "jax:bk"))
    assert "<b>" not in md and "&lt;b&gt;x&lt;/b&gt;\\|\\*y\\*" in md


def test_empty_section_tables_keep_their_columns():
    rows = frame(run_rows(run_id="x", accuracies=(), status="oom", error="out of memory"))
    table = speed.speed_table(rows, tables.runs(rows))
    assert list(table.columns) == speed.COLUMNS and table["dp_seconds"].isna().all()


# --- CLI --------------------------------------------------------------------------------------------------------


def passing() -> list[list[dict]]:
    """jax:bk within every target: overhead 1.1, 0.55 of opacus' DP, 1.22 of the fastest non-private."""
    return [
        run_rows(run_id="bk-dp", variant="bk", seconds=(9.0, 0.55), memory=(100, 110)),
        run_rows(run_id="bk-np", variant="bk", dp=False, seconds=(9.0, 0.5), memory=(90, 100)),
        run_rows(run_id="gh-dp", backend="opacus", variant="ghost", seconds=(9.0, 1.0)),
        run_rows(run_id="gh-np", backend="opacus", variant="ghost", dp=False, seconds=(9.0, 0.45)),
    ]


def test_cli_check_exit_codes(tmp_path, capsys):
    write(tmp_path / "good", *passing())
    assert main(["speed", str(tmp_path / "good"), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### s / w\n") and out.count("| met |") == 5
    write(tmp_path / "bad", *sweep())
    assert main(["speed", str(tmp_path / "bad"), "--check"]) == 1
    assert "| missed |" in capsys.readouterr().out
    assert main(["speed", str(tmp_path / "bad")]) == 0  # without --check the table is the result
    assert main(["speed", str(tmp_path / "bad"), "--label", "opacus:ghost", "--check"]) == 1  # no partner: n/a
    assert "Targets for opacus:ghost:" in capsys.readouterr().out


def test_cli_reads_bench_results_dir(tmp_path, capsys, monkeypatch):
    write(tmp_path, *passing())
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
    assert main(["speed", "--check"]) == 0
    assert "| jax:bk | 0.550 | 0.500 | 1.10× |" in capsys.readouterr().out


def test_cli_defaults_to_the_speed_suite_if_present(tmp_path, capsys):
    write(
        tmp_path,
        run_rows(run_id="a", variant="bk", suite="speed", workload="cnn"),
        run_rows(run_id="b", variant="bk", suite="ci", workload="mlp"),
    )
    assert main(["speed", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "### speed / cnn" in out and "### ci / mlp" not in out
    assert main(["speed", str(tmp_path), "--suite", "ci"]) == 0
    out = capsys.readouterr().out
    assert "### ci / mlp" in out and "### speed / cnn" not in out
    only_ci = tmp_path / "only-ci"
    write(only_ci, run_rows(run_id="b", variant="bk", suite="ci"), run_rows(run_id="c", variant="bk", suite="nightly"))
    assert main(["speed", str(only_ci)]) == 0
    out = capsys.readouterr().out
    assert "### ci / w" in out and "### nightly / w" in out  # no speed suite: every suite


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--suite", "nope"], "no runs of suite 'nope'; suites with results there: s"),
        (["--label", "jax:nope"], "--label 'jax:nope': no runs of that backend:variant; labels there: jax:bk"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_field(tmp_path, capsys, argv, message):
    write(tmp_path, run_rows(run_id="a", variant="bk"))
    assert main(["speed", str(tmp_path), *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and str(tmp_path) in captured.err and captured.out == ""


def test_cli_missing_or_empty_folder_exits_2(tmp_path, capsys):
    assert main(["speed", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err
    assert main(["speed", str(tmp_path)]) == 2
    assert "no result files" in capsys.readouterr().err


def test_a_long_error_line_is_cut_in_the_listing():
    assert (
        speed._reason("Boom: " + "x" * 5000 + "\nsecond line")
        == ("Boom: " + "x" * 5000)[: speed.REASON_CHARS - 1] + "…"
    )
    assert speed._reason("short\nsecond") == "short"
    assert speed._reason(None) == ""
