"""`bench run` flags: memory limit, probe options, and the dry run's projections (probes faked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import cli
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
    assert projected == ["28s", "28s", "oom", "oom", "oom", "oom"]  # 4 + 5 + 19 x 1 s
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
