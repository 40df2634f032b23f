"""`bench compare` on synthetic result folders with known regressions: verdicts and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_rows import run_rows, write

from bench import baseline as baselines
from bench.cli import main
from bench.compare import Thresholds, Verdict, compare
from bench.resultset import ResultsError, load_results

NP_SECONDS = (5.0, 1.00, 1.02, 0.98)
DP_SECONDS = (20.0, 4.00, 4.10, 3.95)


def sweep(**changes) -> list[list[dict]]:
    """jax and opacus, non-private and eps 1, seeds 0 and 1, 4 epochs. `changes[run_id]` overrides fields."""
    runs = []
    for backend, variant in (("jax", "vmap"), ("opacus", "ghost")):
        for seed in (0, 1):
            acc = 0.80 + 0.01 * seed
            common = dict(backend=backend, variant=variant, seed=seed, memory=(100, 110, 110, 110))
            np_id, dp_id = f"{backend}-np-{seed}", f"{backend}-dp-{seed}"
            np_run = dict(run_id=np_id, dp=False, accuracies=(0.5, 0.6, 0.7, acc), seconds=NP_SECONDS, **common)
            dp_run = dict(
                run_id=dp_id,
                accuracies=(0.4, 0.5, 0.6, acc - 0.1),
                seconds=DP_SECONDS,
                epsilons=(0.5, 0.7, 0.85, 1.0),
                epsilons_rdp=(0.6, 0.8, 1.0, 1.2),
                epsilons_reported=(None,) * 4,
                **common,
            )
            for run in (np_run, dp_run):
                run.update(changes.get(run["run_id"], {}))
                if run.pop("drop", False):
                    continue
                runs.append(run_rows(**run))
    return runs


def folders(tmp_path: Path, **changes) -> tuple[Path, Path]:
    base, cur = tmp_path / "base", tmp_path / "cur"
    write(base, *sweep())
    write(cur, *sweep(**changes))
    return base, cur


def run_compare(base: Path, cur: Path, **thresholds) -> list:
    result = compare(load_results(cur), load_results(base), Thresholds(**thresholds))
    return result


def bad(result) -> set[tuple[str, str, str]]:
    return {(c.label, c.privacy, c.metric) for c in result.checks if c.verdict in (Verdict.REGRESSION, Verdict.MISSING)}


def test_identical_results_pass(tmp_path):
    base, cur = folders(tmp_path)
    result = run_compare(base, cur)
    assert result.exit_code == 0 and not result.failed
    metrics = {c.metric for c in result.checks}
    assert {"status", "epsilon", "noise_multiplier", "accuracy", "dp_overhead", "dp_seconds"} <= metrics
    assert result.same_hardware


def test_slower_dp_step_is_a_speed_regression(tmp_path):
    slow = {"seconds": (20.0, 6.0, 6.1, 5.9)}
    base, cur = folders(tmp_path, **{"jax-dp-0": slow, "jax-dp-1": slow})
    result = run_compare(base, cur)
    assert bad(result) == {
        ("jax:vmap", "DP vs non-private", "dp_overhead"),
        ("jax:vmap", "DP vs non-private", "dp_seconds"),
    }
    assert result.exit_code == 1
    overhead = next(c for c in result.checks if c.metric == "dp_overhead" and c.label == "jax:vmap")
    assert overhead.change == pytest.approx(0.5, abs=0.02)


def test_a_uniformly_slower_machine_is_not_a_regression(tmp_path):
    """Another machine: every epoch twice as long, so the overhead ratio holds; absolute times are only shown."""
    changes = {}
    for backend in ("jax", "opacus"):
        for seed in (0, 1):
            for mode, seconds in (("np", NP_SECONDS), ("dp", DP_SECONDS)):
                changes[f"{backend}-{mode}-{seed}"] = {"seconds": tuple(2 * s for s in seconds), "hardware": "other"}
    base, cur = folders(tmp_path, **changes)
    result = run_compare(base, cur)
    assert result.exit_code == 0 and not result.same_hardware
    absolute = [c for c in result.checks if c.metric == "dp_seconds"]
    assert absolute and all(c.verdict == Verdict.INFO for c in absolute)


def test_a_slowdown_within_the_spread_over_epochs_passes(tmp_path):
    noisy = {"seconds": (20.0, 3.0, 6.5, 4.9)}  # median +22%, but the range overlaps the baseline's
    base, cur = folders(tmp_path, **{"jax-dp-0": noisy, "jax-dp-1": noisy})
    result = run_compare(base, cur)
    assert result.exit_code == 0
    overhead = next(c for c in result.checks if c.metric == "dp_overhead" and c.label == "jax:vmap")
    assert "within the spread" in overhead.detail


def test_less_accurate_is_a_regression_only_beyond_threshold_and_seed_spread(tmp_path):
    worse = {"jax-dp-0": {"accuracies": (0.4, 0.5, 0.6, 0.65)}, "jax-dp-1": {"accuracies": (0.4, 0.5, 0.6, 0.66)}}
    base, cur = folders(tmp_path, **worse)
    assert bad(run_compare(base, cur)) == {("jax:vmap", "ε=1", "accuracy")}
    # The same drop with seeds that disagree by more than the drop is noise, not a finding.
    base2, cur2 = tmp_path / "b2", tmp_path / "c2"
    spread = {"jax-dp-0": {"accuracies": (0.4, 0.5, 0.6, 0.60)}, "jax-dp-1": {"accuracies": (0.4, 0.5, 0.6, 0.80)}}
    write(base2, *sweep(**spread))
    write(cur2, *sweep(**{k: {"accuracies": v["accuracies"][:3] + (v["accuracies"][3] - 0.02,)}
                          for k, v in spread.items()}))  # fmt: skip
    assert run_compare(base2, cur2).exit_code == 0
    assert run_compare(base2, cur2, max_accuracy_drop=0.01).exit_code == 0


def test_changed_epsilon_for_identical_settings_is_an_accounting_regression(tmp_path):
    changed = {"epsilons": (0.5, 0.7, 0.85, 1.05)}
    base, cur = folders(tmp_path, **{"opacus-dp-0": changed, "opacus-dp-1": changed})
    result = run_compare(base, cur)
    assert bad(result) == {("opacus:ghost", "ε=1", "epsilon")}
    check = next(c for c in result.checks if c.metric == "epsilon" and c.verdict == Verdict.REGRESSION)
    assert "accounting change" in check.detail


def test_a_new_calibrated_noise_for_the_same_target_matches_and_is_flagged(tmp_path):
    """The target is the identity: a new sigma for it (an accountant change) is a finding, not a new run."""
    sigma = {"noise_multiplier": 1.3}
    base, cur = folders(tmp_path, **{"jax-dp-0": sigma, "jax-dp-1": sigma})
    result = run_compare(base, cur)
    assert bad(result) == {("jax:vmap", "ε=1", "noise_multiplier")}
    assert not [c for c in result.checks if c.verdict == Verdict.NEW]


def test_missing_runs_fail_and_new_runs_pass(tmp_path):
    base, cur = folders(tmp_path, **{"opacus-dp-1": {"drop": True}})
    result = run_compare(base, cur)
    missing = [c for c in result.checks if c.verdict == Verdict.MISSING]
    assert [(c.label, c.detail) for c in missing] == [("opacus:ghost", "seed 1: no current run")]
    assert result.exit_code == 1
    # The other way round: current has a run the baseline lacks.
    result = run_compare(cur, base)
    assert result.exit_code == 0
    assert [c.detail for c in result.checks if c.verdict == Verdict.NEW] == ["seed 1: not in the baseline"]


def test_a_whole_new_backend_is_new_and_a_whole_missing_one_fails(tmp_path):
    base, cur = tmp_path / "base", tmp_path / "cur"
    write(base, *sweep())
    extra = run_rows(run_id="tf-dp-0", backend="tf_privacy", variant="fast")
    write(cur, *sweep(), extra)
    result = run_compare(base, cur)
    assert result.exit_code == 0
    assert [(c.label, c.verdict) for c in result.checks if c.label == "tf_privacy:fast"] == [
        ("tf_privacy:fast", Verdict.NEW)
    ]
    assert run_compare(cur, base).exit_code == 1


def test_a_run_that_now_fails_is_a_regression_with_its_reason(tmp_path):
    failed = {"accuracies": (), "epochs": 4, "status": "oom", "error": "MemoryError: 3 GB\ntrace"}
    base, cur = folders(tmp_path, **{"jax-np-1": failed})
    result = run_compare(base, cur)
    status = [c for c in result.checks if c.metric == "status" and c.verdict == Verdict.REGRESSION]
    assert [c.detail for c in status] == ["seed 1: was ok, now oom: MemoryError: 3 GB"]


def test_matching_ignores_suite_name_and_run_id(tmp_path):
    base, cur = tmp_path / "base", tmp_path / "cur"
    write(base, *sweep())
    renamed = [[{**r, "suite": "renamed", "run_id": "x" + r["run_id"]} for r in run] for run in sweep()]
    for run in renamed:  # the stored spec names the suite too
        for r in run:
            spec = json.loads(r["spec"])
            r["spec"] = json.dumps({**spec, "suite": "renamed"})
    write(cur, *renamed)
    result = run_compare(base, cur)
    assert result.exit_code == 0 and not [c for c in result.checks if c.verdict in (Verdict.NEW, Verdict.MISSING)]


def test_memory_growth_on_the_same_hardware(tmp_path):
    big = {"memory": (200, 220, 220, 220)}
    base, cur = folders(tmp_path, **{"jax-dp-0": big, "jax-dp-1": big})
    assert bad(run_compare(base, cur)) == {("jax:vmap", "DP vs non-private", "dp_peak_memory_mb")}


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="max_slowdown: got -1"):
        Thresholds(max_slowdown=-1)


# --- CLI, baselines, micro-benchmarks ---------------------------------------------------------------------------


def test_cli_exit_codes_and_formats(tmp_path, capsys):
    base, cur = folders(tmp_path, **{"jax-dp-0": {"accuracies": (0.1, 0.1, 0.1, 0.1)}})
    assert main(["compare", str(base), "--baseline", str(base)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["compare", str(cur), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "FAIL" in out
    assert main(["compare", str(cur), "--baseline", str(base), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] is False and doc["exit_code"] == 1 and doc["counts"]["regression"] >= 1
    assert main(["compare", str(cur), "--baseline", str(base), "--format", "md"]) == 1
    assert capsys.readouterr().out.startswith("**FAIL")
    assert main(["compare", str(cur), "--baseline", str(base), "--max-accuracy-drop", "0.9"]) == 0


def test_cli_unusable_input_exits_2(tmp_path, capsys):
    base, _ = folders(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), "--baseline", str(base)]) == 2
    assert "no result files" in capsys.readouterr().err
    assert main(["compare", str(base), "--baseline", str(tmp_path / "nothing-here")]) == 2
    assert "no saved baseline of that name" in capsys.readouterr().err
    other = tmp_path / "other"
    write(other, run_rows(run_id="z", dataset="digits", model="cnn"))
    assert main(["compare", str(other), "--baseline", str(base)]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", str(base), "--baseline", str(base), "--max-slowdown", "-0.1"])


def test_baseline_save_and_resolve(tmp_path, capsys):
    base, cur = folders(tmp_path)
    (base / "_benchmarks").mkdir()
    (base / "_benchmarks" / "core.json").write_text(json.dumps(_bench_json(0.002)))
    root = tmp_path / "baselines"
    assert main(["baseline", "save", "nightly", str(base), "--root", str(root)]) == 0
    saved = root / "nightly"
    assert sorted(p.name for p in saved.iterdir()) == ["_benchmarks", "baseline.json", "results.parquet"]
    manifest = json.loads((saved / "baseline.json").read_text())
    assert manifest["runs"] == 8 and manifest["statuses"] == {"ok": 8}
    assert baselines.resolve("nightly", root=root) == saved
    with pytest.raises(ResultsError, match="saved: nightly"):
        baselines.resolve("weekly", root=root)
    result = compare(load_results(cur), load_results(saved))
    assert result.exit_code == 0
    assert main(["baseline", "list", "--root", str(root)]) == 0
    assert "nightly" in capsys.readouterr().out
    assert main(["baseline", "save", "../x", str(base), "--root", str(root)]) == 2


def _bench_json(median: float) -> dict:
    return {
        "machine_info": {"cpu": {"brand_raw": "test cpu"}},
        "benchmarks": [{"name": "test_poisson_batch", "stats": {"median": median}}],
    }


def test_micro_benchmarks_are_shown_not_judged(tmp_path, capsys):
    base, cur = folders(tmp_path)
    for folder, median in ((base, 0.002), (cur, 0.004)):
        (folder / "_benchmarks").mkdir()
        (folder / "_benchmarks" / "core.json").write_text(json.dumps(_bench_json(median)))
    result = run_compare(base, cur)
    bench = [c for c in result.checks if c.metric == "benchmark"]
    assert [(c.workload, c.label, c.baseline, c.current, c.verdict) for c in bench] == [
        ("core", "test_poisson_batch", 0.002, 0.004, Verdict.INFO)
    ]
    assert result.exit_code == 0
    main(["compare", str(cur), "--baseline", str(base)])
    assert "4.000 ms" in capsys.readouterr().out


def test_overhead_only_shows_absolute_seconds_without_judging_them(tmp_path):
    """A busy machine slows everything: with absolute=False only the overhead ratio can fail."""
    slow = {"seconds": tuple(3 * s for s in NP_SECONDS)}
    base, cur = folders(tmp_path, **{"jax-np-0": slow, "jax-np-1": slow})
    assert ("jax:vmap", "DP vs non-private", "non_private_seconds") in bad(run_compare(base, cur))
    result = run_compare(base, cur, absolute=False)
    assert result.exit_code == 0
    absolute = next(c for c in result.checks if c.metric == "non_private_seconds" and c.label == "jax:vmap")
    assert absolute.verdict == Verdict.INFO and "not judged" in absolute.detail
