"""The Ray executor's parts that need no cluster: address checks, flags, the gpus perf flag, the sweep tally,
the message of a sweep stopped with several runs in flight. tests/integration/test_ray_executor.py runs it on a
real cluster."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bench import cli
from bench.ray_executor import RayRunner, RayUnavailable, Tally, _check_reachable
from bench.runner import Outcome, SweepInterrupted
from bench.spec import PerfFlags, SpecError
from tests.reliability.conftest import small_run


@pytest.mark.parametrize("address", [None, "auto", "ray://10.0.0.5:10001"])
def test_addresses_ray_resolves_itself_are_not_probed(address):
    _check_reachable(address)


@pytest.mark.parametrize("address", ["10.0.0.5", "host:port", ":"])
def test_a_malformed_address_says_what_is_expected(address):
    with pytest.raises(RayUnavailable, match="expected auto or HOST:PORT"):
        _check_reachable(address)


def test_nothing_listening_fails_in_seconds_with_what_to_do():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(RayUnavailable, match=f"(?s)no Ray cluster at 127.0.0.1:{port}.*ray start --head"):
            _check_reachable(f"127.0.0.1:{port}", timeout=2)


def test_a_listening_port_passes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        _check_reachable(f"127.0.0.1:{s.getsockname()[1]}")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--address", "auto"], "--address and --ray-retries need --executor ray"),
        (["--ray-retries", "1"], "--address and --ray-retries need --executor ray"),
        (["--executor", "ray", "--ray-retries", "-1"], "--ray-retries: got '-1', expected an integer from 0 to 100"),
        (["--executor", "ray", "--ray-retries", "x"], "--ray-retries: got 'x'"),
        (["--executor", "slurm"], "invalid choice: 'slurm'"),
    ],
)
def test_bad_executor_flags_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "quickstart", *argv])
    assert info.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_retries_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="retries must be >= 0"):
        RayRunner(tmp_path, retries=-1)


@pytest.mark.parametrize("gpus", [-1, 1.5, True, 65])
def test_gpus_is_a_small_non_negative_integer(gpus):
    with pytest.raises(SpecError, match="gpus"):
        PerfFlags(gpus=gpus)


def test_gpus_does_not_change_the_run_id():
    """What a run reserves is not what it computes: results of a run with gpus: 1 still match it without."""
    run = small_run()
    assert small_run(perf=PerfFlags(threads=run.perf.threads, gpus=1)).run_id == run.run_id


def test_tally_line():
    from bench.progress import SweepProgress

    progress = SweepProgress(5)
    progress.tally(Tally(total=5, queued=2, running=2, done=1, failed=1))
    (task,) = [t for t in progress._progress.tasks if t.id == progress._sweep]
    assert task.description == "sweep: 2 queued, 2 running, 1 done, 1 failed" and task.completed == 1


def test_a_sweep_stopped_with_several_runs_in_flight_names_them_all(tmp_path):
    runs = [small_run(seed=s) for s in (0, 1, 2)]
    stopped = [Outcome(r, "interrupted", "x", Path(f"{r.run_id}.parquet")) for r in runs[1:]]
    e = SweepInterrupted([Outcome(runs[0], "ok", "", Path("a"))], stopped[0], "", stopped)
    args = cli.build_parser().parse_args(["run", "quickstart", "--executor", "ray"])
    args.argv = ["run", "quickstart", "--executor", "ray"]
    text = cli._interrupted_message(e, 3, tmp_path, args)
    assert "1 of 3 runs had ended (1 ok)" in text
    assert f"The 2 runs it stopped ({runs[1].run_id}, {runs[2].run_id}) are recorded as interrupted" in text
    assert "To resume (finished runs are skipped): bench run quickstart --executor ray" in text


def test_a_node_on_another_commit_is_refused_with_what_to_do():
    from bench.ray_executor import commit_mismatch

    assert commit_mismatch("abc", "abc", "n1") == ""
    assert commit_mismatch("", "abc", "n1") == "" and commit_mismatch("abc", "", "n1") == ""
    message = commit_mismatch("abc", "def", "host/1234")
    assert "node host/1234 runs commit abc of dpbench, the driver def" in message
    assert "--retry-failed" in message


def test_a_run_that_reserves_no_gpu_sees_none():
    """Ray leaves a task with num_gpus=0 every GPU of its node; the worker of such a run is given none."""
    from bench.ray_executor import device_env

    assert device_env(0) == {"CUDA_VISIBLE_DEVICES": ""}
    assert device_env(1) == {}  # Ray's own CUDA_VISIBLE_DEVICES (the GPUs it assigned) stays


def test_extra_env_reaches_the_worker(tmp_path):
    """run_worker hands `extra_env` to the worker process on top of the pinned environment."""
    from bench.runner import run_worker

    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'job="$3"; events=$(sed -e \'s/.*"events": "\\([^"]*\\)".*/\\1/\' "$job")\n'
        'printf \'{"event": "env", "cuda": "%s", "threads": "%s"}\\n\' "${CUDA_VISIBLE_DEVICES-unset}" '
        '"$OMP_NUM_THREADS" > "$events"\n'
    )
    fake.chmod(0o755)
    run = small_run()
    events: list[dict] = []
    ended = run_worker(str(fake), run, {}, tmp_path / "w", 30, None, events, extra_env={"CUDA_VISIBLE_DEVICES": ""})
    assert ended.returncode == 0
    assert events == [{"event": "env", "cuda": "", "threads": str(run.perf.threads)}]
