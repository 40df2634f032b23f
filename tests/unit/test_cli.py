"""`bench run` flags: memory limit, probe options, and the dry run's projections (probes faked)."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import accounting, cli
from bench.runner import ProbeResult, Runner
from bench.spec import RunSpec

SUITE = {
    "name": "tiny",
    "backends": ["jax"],
    "seeds": [0, 1],
    "timeout": 100,
    "workloads": [
        {
            "name": "synth",
            "dataset": {"name": "synthetic", "train_size": 1000, "test_size": 100},
            "model": "mlp",
            "train": {"epochs": 2, "batch_size": 100},  # 20 steps
            "privacy": [{"dp": False}, {"noise_multiplier": 1.0}, {"noise_multiplier": 2.0}],
        }
    ],
}


@pytest.mark.parametrize(
    "seconds, text", [(3.24, "3.2s"), (42.4, "42s"), (200, "3m20s"), (3599.6, "1h00m"), (7500, "2h05m")]
)
def test_format_duration(seconds, text):
    assert cli.format_duration(seconds) == text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--probe"], "--probe only works with --dry-run"),
        (["--memory-limit", "0"], "--memory-limit: got '0', expected a number > 0"),
        (["--memory-limit", "lots"], "--memory-limit: got 'lots', expected a number > 0"),
        (["--dry-run", "--probe", "--probe-steps", "2.5"], "--probe-steps: got '2.5'"),
        (["--dry-run", "--probe", "--probe-timeout", "-1"], "--probe-timeout: got '-1'"),
    ],
)
def test_bad_flags_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "quickstart", *argv])
    assert info.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    return path


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Fake probes: non-private 1 s/step, DP out of memory; records each call."""
    calls: list[tuple] = []

    def probe(self: Runner, run: RunSpec, steps: int, timeout: float, memory_limit_gb: float | None = None):
        calls.append((run.dp.enabled, steps, timeout, memory_limit_gb, self.memory_limit_gb))
        if run.dp.enabled:
            return ProbeResult("oom", "worker used 9.0 GiB, over the memory limit of 1.0 GiB")
        return ProbeResult("ok", "", build_seconds=1.0, first_step_seconds=5.0, step_seconds=1.0, startup_seconds=4.0)

    monkeypatch.setattr(Runner, "probe", probe)
    return calls


def _table(out: str) -> list[str]:
    return [line for line in out.splitlines() if " synth " in line and not line.startswith("probing")]


def test_dry_run_probes_each_distinct_cost_once_and_projects_every_run(capsys, suite_file, probes):
    argv = ["run", str(suite_file), "--dry-run", "--probe", "--probe-steps", "3", "--probe-timeout", "60"]
    assert cli.main([*argv, "--results", str(suite_file.parent / "r")]) == 0
    out = capsys.readouterr().out
    assert [c[:3] for c in probes] == [(False, 3, 60.0), (True, 3, 60.0)]
    assert "probing jax:bk synth mlp non-private ... 1 s/step" in out
    assert "probing jax:bk synth mlp dp ... oom: worker used 9.0 GiB" in out
    rows = _table(out)
    assert len(rows) == 6
    projected = [line.split()[-2] for line in rows]
    assert projected == ["28s", "oom", "oom", "28s", "oom", "oom"]  # 4 + 5 + 19 x 1 s; per seed, privacy in order
    assert "projected" in out.splitlines()[3]
    assert "would exceed" not in out
    assert not (suite_file.parent / "r").exists() or not list((suite_file.parent / "r").rglob("*.parquet"))


def test_dry_run_names_runs_that_would_time_out(capsys, suite_file, probes):
    assert cli.main(["run", str(suite_file), "--dry-run", "--probe", "--timeout", "20", "--memory-limit", "4"]) == 0
    out = capsys.readouterr().out
    assert {c[3:] for c in probes} == {(4.0, 4.0)}
    last = out.splitlines()[-1]
    assert last.startswith("2 runs would exceed the per-run timeout of 20s (they will end as timeout): ")
    non_private = [line.split()[0] for line in _table(out) if line.split()[4] == "no"]
    assert last.endswith(", ".join(non_private))


def test_dry_run_without_probe_is_unchanged(capsys, suite_file, probes):
    assert cli.main(["run", str(suite_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert probes == [] and "projected" not in out and "probing" not in out
    assert len(_table(out)) == 6


def test_output_into_a_closed_pipe_ends_quietly():
    """`bench ... | head`: the reader leaves before bench has written; no traceback, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "run", "quickstart", "--dry-run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait() == 0, stderr
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr


# --- bench calibrate, federated form (the TensorFlow Federated DP tutorial) ----------------------------------------

TUTORIAL = ["calibrate", "--epsilon", "2", "--delta", "1e-5", "--total-clients", "3383", "--rounds", "100"]
TUTORIAL_TABLE = """\
target epsilon=2 delta=1e-05 total clients=3383 rounds=100 noise per client=0.01
accountant clients/round    noise  epsilon        q
PLD                  104   1.0400   1.9846  0.03074
RDP                  120   1.2000   1.9861  0.03547
"""


_calibrate_clients = functools.cache(accounting.calibrate_clients)


@pytest.fixture
def cached_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tutorial's calibration takes a few seconds; compute it once for all the CLI tests."""
    monkeypatch.setattr("bench.accounting.calibrate_clients", _calibrate_clients)


@pytest.mark.parametrize(
    "noise", [["--noise-per-client", "0.01"], ["--base-noise", "0.5", "--base-clients", "50"]], ids=["ratio", "base"]
)
def test_calibrate_clients_per_round_reproduces_the_tutorial(capsys, cached_calibration, noise):
    assert cli.main([*TUTORIAL, *noise]) == 0
    assert capsys.readouterr().out == TUTORIAL_TABLE


def test_calibrate_federated_names_an_accountant_that_cannot_reach_the_target(capsys, monkeypatch):
    from bench.accounting import CalibrationError, ClientCalibration

    def fake(*, accountant: str, **_):
        if accountant == "rdp":
            raise CalibrationError("out of reach with RDP even with all 3383 clients")
        return ClientCalibration(clients_per_round=605, noise_multiplier=6.05, epsilon=1.1499, accountant="pld")

    monkeypatch.setattr("bench.accounting.calibrate_clients", fake)
    assert cli.main([*TUTORIAL, "--noise-per-client", "0.01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["PLD", "605", "6.0500", "1.1499", "0.1788"]
    assert out[3].split() == ["RDP", "-", "-", "-", "-", "out", "of", "reach"]
    assert out[4] == "note: out of reach with RDP even with all 3383 clients"


def test_calibrate_federated_out_of_reach_is_a_usage_error(capsys):
    argv = ["calibrate", "--epsilon", "1", "--total-clients", "3383", "--rounds", "100", "--noise-per-client", "0.01"]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert (
        "error: epsilon 1 at delta 1e-05 is out of reach with PLD even with all 3383 clients" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--sample-rate: got None, expected --sample-rate Q (DP-SGD) or --total-clients N (federated)"),
        (
            ["--sample-rate", "0.01", "--total-clients", "10", "--rounds", "3", "--noise-per-client", "1"],
            "--sample-rate: got 0.01, expected no --sample-rate with --total-clients",
        ),
        (
            ["--epochs", "2", "--total-clients", "10", "--rounds", "3", "--noise-per-client", "1"],
            "--epochs: got 2, expected no --epochs with --total-clients",
        ),
        (["--rounds", "3", "--noise-per-client", "1"], "--total-clients: got None"),
        (["--total-clients", "10", "--noise-per-client", "1"], "--rounds: got None"),
        (["--total-clients", "10", "--rounds", "3"], "--noise-per-client: got None, expected --noise-per-client C, or"),
        (["--total-clients", "10", "--rounds", "3", "--base-noise", "1"], "--base-clients: got None"),
        (["--total-clients", "10", "--rounds", "3", "--base-clients", "5"], "--base-noise: got None"),
        (
            ["--total-clients", "10", "--rounds", "3", "--noise-per-client", "1", "--base-noise", "1"],
            "--base-noise: got 1.0, expected either --noise-per-client or --base-noise/--base-clients, not both",
        ),
        (
            ["--total-clients", "10", "--rounds", "3", "--noise-per-client", "1", "--delta", "1"],
            "--delta: got 1.0, expected 0 < delta < 1",
        ),
    ],
)
def test_calibrate_contradictory_or_missing_flags(capsys, argv, message):
    assert cli.main(["calibrate", "--epsilon", "2", *argv]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--total-clients", "--rounds", "--base-clients"])
def test_calibrate_counts_must_be_positive_integers(capsys, flag):
    with pytest.raises(SystemExit) as info:
        cli.main(["calibrate", "--epsilon", "2", flag, "0"])
    assert info.value.code == cli.EXIT_USAGE
    assert f"{flag}: got '0', expected a number > 0" in capsys.readouterr().err
