"""`bench`: a thin command layer over the core."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench.spec import SpecError

if TYPE_CHECKING:
    from bench.runner import ProbeResult
    from bench.spec import RunSpec
    from bench.suite import Suite

EXIT_USAGE = 2


def _results_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("BENCH_RESULTS_DIR") or "results")


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: got {value!r}, expected integers such as 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds: got {value!r}, expected integers >= 0")
    return seeds


def cmd_suites(args: argparse.Namespace) -> int:
    from bench.suite import SuiteError, list_suites, load_suite

    for path in list_suites():
        try:
            suite = load_suite(path)
            print(f"{path.stem:<16} {len(suite.runs):>4} runs  {suite.description}")
        except SuiteError as e:
            print(f"{path.stem:<16} INVALID: {e}")
    return 0


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else format(x, spec)


def _positive(kind: type, flag: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not number > 0:
            raise argparse.ArgumentTypeError(f"{flag}: got {value!r}, expected a number > 0")
        return number

    return parse


def _retries(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 100:
        raise argparse.ArgumentTypeError(f"--ray-retries: got {value!r}, expected an integer from 0 to 100")
    return number


def format_duration(seconds: float) -> str:
    """3.2s, 42s, 3m20s, 2h05m."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _probe_line(result: ProbeResult) -> str:
    if result.status != "ok":
        return f"{result.status}: {(result.error.splitlines() or [''])[0]}"
    return (
        f"{result.step_seconds:.3g} s/step (first step {result.first_step_seconds:.3g} s, "
        f"start-up and build {result.startup_seconds:.1f} s)"
    )


def _probe_suite(suite: Suite, results: Path, args: argparse.Namespace) -> dict[str, ProbeResult]:
    """One probe per distinct per-step cost (see `probe_key`), shared by the runs it stands for."""
    from bench.runner import Runner, probe_key

    runner = Runner(results, env=args.env, memory_limit_gb=args.memory_limit)
    memory_limit = args.memory_limit or suite.memory_limit_gb
    probes: dict[tuple, ProbeResult] = {}
    for run in suite.runs:
        key = probe_key(run)
        if key in probes:
            continue
        privacy = "dp" if run.dp.enabled else "non-private"
        print(f"probing {run.backend_label} {run.workload} {run.model} {privacy} ...", end=" ", flush=True)
        probes[key] = runner.probe(run, args.probe_steps, args.probe_timeout, memory_limit)
        print(_probe_line(probes[key]), flush=True)
    return {run.run_id: probes[probe_key(run)] for run in suite.runs}


def _projection(run: RunSpec, probe: ProbeResult) -> str:
    seconds = probe.projected_seconds(run.total_steps)
    return probe.status if seconds is None else format_duration(seconds)


def _print_over_timeout(suite: Suite, probes: dict[str, ProbeResult], timeout: float) -> None:
    over = [r.run_id for r in suite.runs if (probes[r.run_id].projected_seconds(r.total_steps) or 0) > timeout]
    if over:
        runs = "1 run would" if len(over) == 1 else f"{len(over)} runs would"
        print(
            f"{runs} exceed the per-run timeout of {format_duration(timeout)} "
            f"(they will end as timeout): {', '.join(over)}"
        )


def _epsilon_text(run: RunSpec, eps: float | None) -> str:
    mark = "†" if run.dp.enabled and run.dp.sampling == "shuffle" else ""
    return _fmt(eps) + mark


def _dry_run(suite: Suite, results: Path, args: argparse.Namespace) -> int:
    from bench.results import read_status, result_path
    from bench.runner import projected_epsilon

    try:
        probes = _probe_suite(suite, results, args) if args.probe else None
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    print(f"suite {suite.name!r} ({suite.path}): {len(suite.runs)} runs, results in {results}")
    header = f"{'run_id':<16} {'workload':<20} {'backend':<25} {'seed':>4} {'dp':>3} {'sigma':>8} "
    header += f"{'q':>8} {'steps':>7} {'epsilon':>8}  "
    print(header + (f"{'projected':>10}  " if probes is not None else "") + "status")
    for run in suite.runs:
        path = result_path(results, run.suite, run.run_id)
        status = (read_status(path) or "unreadable") if path.exists() else "pending"
        projected = f"{_projection(run, probes[run.run_id]):>10}  " if probes is not None else ""
        print(
            f"{run.run_id:<16} {run.workload[:20]:<20} {run.backend_label[:25]:<25} {run.seed:>4} "
            f"{'yes' if run.dp.enabled else 'no':>3} {_fmt(run.dp.noise_multiplier, '.4g'):>8} "
            f"{run.sample_rate:>8.4g} {run.total_steps:>7} {_epsilon_text(run, projected_epsilon(run)):>8}  "
            f"{projected}{status}"
        )
    if any(r.dp.enabled and r.dp.sampling == "shuffle" for r in suite.runs):
        print("†: shuffle sampling; the accountant assumes Poisson, so this epsilon is not a valid guarantee")
    if probes is not None:
        _print_over_timeout(suite, probes, args.timeout or suite.timeout)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a shutdown) stops a sweep like Ctrl-C does."""


_terminated: list[int] = []  # SIGTERM seen: Ray's blocking calls turn any interrupt into a plain KeyboardInterrupt


def _terminate(signum: int, frame: object) -> None:
    _terminated.append(signum)
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def _resume_command(args: argparse.Namespace) -> str:
    """The command that resumes the sweep: the same `bench run`, without --force (which would redo it all)."""
    argv = [a for a in (getattr(args, "argv", None) or []) if a != "--force"]
    return shlex.join(["bench", *argv]) if argv else "the same `bench run` command"


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import ResultWriteError, Runner, SweepInterrupted, describe_run
    from bench.suite import load_suite

    suite = load_suite(args.suite, backends=args.backends, seeds=args.seeds)
    results = _results_dir(args.results)
    if args.dry_run:
        return _dry_run(suite, results, args)
    import time

    from bench.progress import SweepProgress

    started = time.perf_counter()
    _terminated.clear()
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        with SweepProgress(len(suite.runs)) as progress:
            common = {
                "env": args.env,
                "timeout": args.timeout,
                "memory_limit_gb": args.memory_limit,
                "log": progress.log,
                "on_progress": progress.on_event,
            }
            if args.executor == "ray":
                from bench.ray_executor import DEFAULT_RETRIES, RayRunner, RayUnavailable

                retries = DEFAULT_RETRIES if args.ray_retries is None else args.ray_retries
                runner = RayRunner(results, address=args.address, retries=retries, on_tally=progress.tally, **common)
                progress.concurrent = True
                try:
                    progress.log(f"connecting to Ray ({args.address or 'default address'}) ...")
                    runner.connect()
                except RayUnavailable as e:
                    progress.log(f"error: {e}")
                    return 2
                if previous is not None:  # ray.init installs its own SIGTERM handler, which exits at once
                    signal.signal(signal.SIGTERM, _terminate)
            else:
                runner = Runner(results, **common)
            progress.describe = describe_run
            try:
                outcomes = runner.run_suite(
                    suite, force=args.force, retry_failed=args.retry_failed, on_start=progress.start
                )
            except SweepInterrupted as e:
                progress.log(_interrupted_message(e, len(suite.runs), results, args))
                terminated = isinstance(e.__cause__, Terminated) or bool(_terminated)
                return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
            except ResultWriteError as e:
                full = getattr(e.__cause__, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                progress.log(
                    f"error: {e}\nThe sweep stopped ({_summary(e.outcomes)} before it); results written before "
                    f"are intact. {'Free some space' if full else 'Fix that'}, then resume with: "
                    f"{_resume_command(args)}"
                )
                return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    minutes, seconds = divmod(time.perf_counter() - started, 60)
    if outcomes:
        where = results / outcomes[0].path.parent.name
        print(f"{len(outcomes)} runs: {_summary(outcomes)} in {minutes:.0f}m{seconds:02.0f}s. Results in {where}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _summary(outcomes: list) -> str:
    """'2 ok, 1 timeout', and how many of them another `bench run` on the same folder executed."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs"
    elsewhere = sum(o.elsewhere for o in outcomes)
    if elsewhere:
        summary += f" ({elsewhere} of them run by another bench run on the same results folder)"
    return summary


def _interrupted_message(e, total: int, results: Path, args: argparse.Namespace) -> str:
    """What a stopped sweep left: the finished runs, the partial result of the one it stopped, how to resume."""
    reason = str(e) or ("stopped by SIGTERM" if _terminated else "interrupted")
    lines = [
        f"{reason}: {len(e.outcomes)} of {total} runs had ended ({_summary(e.outcomes)}); they are kept in {results}."
    ]
    if len(e.stopped) > 1:
        lines.append(
            f"The {len(e.stopped)} runs it stopped ({', '.join(o.run.run_id for o in e.stopped)}) are recorded as "
            "interrupted with the epochs they had finished; resuming runs them again."
        )
    elif e.current is not None:
        lines.append(
            f"The run it stopped, {e.current.run.run_id}, is recorded as interrupted with the epochs it had "
            f"finished ({e.current.path}); resuming runs it again."
        )
    lines.append(f"To resume (finished runs are skipped): {_resume_command(args)}")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import make_report, render

    source = Path(args.results) if args.results else _results_dir(None)
    report = make_report(source, suite=args.suite)
    text = render(report, args.format)
    for skipped in report.results.skipped:
        print(f"warning: skipped unreadable result file {skipped.path}: {skipped.reason}", file=sys.stderr)
    out = args.out or (Path("reports/index.html") if args.format == "html" else None)
    if out is None:
        sys.stdout.write(text)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    charts = text.count('class="chart"') if args.format == "html" else 0
    detail = f", {charts} charts" if args.format == "html" else ""
    print(f"wrote {out} ({len(report.runs)} runs in {len(report.sections)} workloads{detail})")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    """Markdown speed tables of a results folder; with --check, exit 1 unless every target of the label is met."""
    from bench.report import speed
    from bench.resultset import ResultsError, load_results

    source = Path(args.results) if args.results else _results_dir(None)
    results = load_results(source, suite=args.suite)
    for skipped in results.skipped:
        print(f"warning: skipped unreadable result file {skipped.path}: {skipped.reason}", file=sys.stderr)
    rows = speed.pick_suite(results.frame, args.suite)
    label = args.label or speed.default_label()
    known = speed.labels(rows)
    if label not in known:
        raise ResultsError(
            f"{source}: --label {label!r}: no runs of that backend:variant; labels there: {', '.join(known)}"
        )
    report = speed.build(rows, label)
    sys.stdout.write(speed.render_speed(report))
    return 0 if not args.check or report.passed else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from bench import compare
    from bench.baseline import resolve
    from bench.resultset import load_results

    thresholds = compare.Thresholds(
        max_slowdown=args.max_slowdown,
        max_accuracy_drop=args.max_accuracy_drop,
        max_memory_growth=args.max_memory_growth,
        absolute=not args.overhead_only,
    )
    current = load_results(args.current, suite=args.suite)
    baseline = load_results(resolve(args.baseline), suite=args.suite)
    result = compare.compare(current, baseline, thresholds)
    for skipped in result.skipped_files:
        print(f"warning: skipped {skipped}", file=sys.stderr)
    if args.format == "json":
        sys.stdout.write(compare.format_json(result))
    elif args.format == "md":
        sys.stdout.write(compare.format_markdown(result, verbose=args.verbose))
    else:
        sys.stdout.write(compare.format_text(result, verbose=args.verbose))
    return result.exit_code


def cmd_baseline(args: argparse.Namespace) -> int:
    from bench import baseline

    root = Path(args.root) if args.root else baseline.BASELINES_DIR
    if args.action == "list":
        for path in sorted(root.glob("*/baseline.json")):
            info = json.loads(path.read_text())
            print(f"{info['name']:<16} {info['runs']:>4} runs  {', '.join(info['suites'])}  saved {info['saved_at']}")
        return 0
    if not args.name:
        print("error: bench baseline save NAME [RESULTS]: NAME is missing", file=sys.stderr)
        return EXIT_USAGE
    dest = baseline.save(_results_dir(args.results), args.name, suite=args.suite, root=root)
    print(f"saved baseline {args.name!r} in {dest}")
    return 0


def _fraction(flag: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (number >= 0 and math.isfinite(number)):
            raise argparse.ArgumentTypeError(f"{flag}: got {value!r}, expected a number >= 0 such as 0.15")
        return number

    return parse


def cmd_data(args: argparse.Namespace) -> int:
    from bench.data import loaders

    if args.download:

        def progress(done: int, total: int | None) -> None:
            pct = f" {100 * done / total:.0f}%" if total else ""
            print(f"\r  {done / 2**20:.1f} MiB{pct}", end="", file=sys.stderr)

        try:
            path = loaders.download(args.download, progress=progress)
        except (ConnectionError, ValueError) as e:  # no network, or a name without a download
            print(f"\nerror: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"\n{args.download} downloaded to {path}")
        return 0
    for row in loaders.describe():
        state = f"available at {row['location']}" if row["available"] else "not found"
        print(f"{row['name']:<14} {state}")
        if not row["available"]:
            print(f"{'':<14} searched: {', '.join(row['searched']) or '-'}")
            print(f"{'':<14} how: {row['how']}")
    return 0


def _steps(args: argparse.Namespace) -> int:
    if args.steps is not None:
        return args.steps
    if args.epochs is None:
        raise SpecError("--steps", None, "--steps N or --epochs E")
    return args.epochs * max(1, round(1 / args.sample_rate))


def _check_rate(q: float) -> None:
    if not 0 < q <= 1:
        raise SpecError("--sample-rate", q, "0 < q <= 1")


def cmd_epsilon(args: argparse.Namespace) -> int:
    from bench.accounting import epsilon

    _check_rate(args.sample_rate)
    steps = _steps(args)
    eps = epsilon(sample_rate=args.sample_rate, noise_multiplier=args.sigma, steps=steps, delta=args.delta)
    print(f"q={args.sample_rate:g} sigma={args.sigma:g} steps={steps} delta={args.delta:g}")
    print(f"epsilon (PLD) = {eps.pld:.4f}")
    print(f"epsilon (RDP) = {eps.rdp:.4f}")
    return 0


_FEDERATED_FLAGS = ("total_clients", "rounds", "noise_per_client", "base_noise", "base_clients")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _noise_per_client(args: argparse.Namespace) -> float:
    """--noise-per-client, or --base-noise / --base-clients as in the TFF DP tutorial."""
    base = [name for name in ("base_noise", "base_clients") if getattr(args, name) is not None]
    if args.noise_per_client is not None:
        if base:
            raise SpecError(
                _flag(base[0]),
                getattr(args, base[0]),
                "either --noise-per-client or --base-noise/--base-clients, not both",
            )
        return args.noise_per_client
    expected = "--noise-per-client C, or --base-noise Z with --base-clients M (C = Z / M)"
    if args.base_noise is None:
        raise SpecError("--base-noise" if base else "--noise-per-client", None, expected)
    if args.base_clients is None:
        raise SpecError("--base-clients", None, expected)
    return args.base_noise / args.base_clients


def _calibrate_federated(args: argparse.Namespace) -> int:
    """DP-FedAvg (user-level): the fewest clients per round reaching the target, noise growing with them."""
    from bench.accounting import CalibrationError, calibrate_clients

    for name in ("sample_rate", "steps", "epochs"):
        if getattr(args, name) is not None:
            why = "the federated form takes --rounds, and q = clients per round / --total-clients"
            raise SpecError(_flag(name), getattr(args, name), f"no {_flag(name)} with --total-clients ({why})")
    if args.total_clients is None:
        raise SpecError("--total-clients", None, "--total-clients N with --rounds and --noise-per-client")
    if args.rounds is None:
        raise SpecError("--rounds", None, "--rounds R with --total-clients")
    if not args.epsilon > 0:
        raise SpecError("--epsilon", args.epsilon, "a number > 0")
    if not 0 < args.delta < 1:
        raise SpecError("--delta", args.delta, "0 < delta < 1")
    per_client = _noise_per_client(args)
    print(
        f"target epsilon={args.epsilon:g} delta={args.delta:g} total clients={args.total_clients} "
        f"rounds={args.rounds} noise per client={per_client:g}"
    )
    print(f"{'accountant':<10} {'clients/round':>13} {'noise':>8} {'epsilon':>8} {'q':>8}")
    failures = []
    for acc in ("pld", "rdp"):
        try:
            found = calibrate_clients(
                target_epsilon=args.epsilon,
                delta=args.delta,
                rounds=args.rounds,
                total_clients=args.total_clients,
                noise_per_client=per_client,
                accountant=acc,
            )
        except CalibrationError as e:
            failures.append(e)
            print(f"{acc.upper():<10} {'-':>13} {'-':>8} {'-':>8} {'-':>8}  out of reach")
            continue
        q = found.clients_per_round / args.total_clients
        print(
            f"{acc.upper():<10} {found.clients_per_round:>13} {found.noise_multiplier:>8.4f} {found.epsilon:>8.4f} {q:>8.4g}"
        )
    if len(failures) == 2:
        raise failures[0]
    for e in failures:
        print(f"note: {e}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from bench.accounting import calibrate_noise, epsilon

    if any(getattr(args, name) is not None for name in _FEDERATED_FLAGS):
        return _calibrate_federated(args)
    if args.sample_rate is None:
        raise SpecError("--sample-rate", None, "--sample-rate Q (DP-SGD) or --total-clients N (federated)")
    _check_rate(args.sample_rate)
    steps = _steps(args)
    print(f"target epsilon={args.epsilon:g} delta={args.delta:g} q={args.sample_rate:g} steps={steps}")
    for acc in ("pld", "rdp"):
        sigma = calibrate_noise(
            target_epsilon=args.epsilon, sample_rate=args.sample_rate, steps=steps, delta=args.delta, accountant=acc
        )
        eps = epsilon(sample_rate=args.sample_rate, noise_multiplier=sigma, steps=steps, delta=args.delta)
        print(f"sigma ({acc.upper()}) = {sigma:.4f}  (gives epsilon {getattr(eps, acc):.4f})")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from bench.backend import backend_names, parse_backend
    from bench.envs import ensure_env, env_dir, is_ready

    if args.action == "list":
        for name in backend_names():
            print(f"{name:<12} {'ready' if is_ready(name) else 'not created'}  {env_dir(name)}")
        return 0
    for label in args.backends or backend_names():
        name, _ = parse_backend(label)
        print(f"{name}: {ensure_env(name)}")
    return 0


def _federated_calibrate_args(c: argparse.ArgumentParser) -> None:
    """`bench calibrate`'s federated form: the TFF DP tutorial's clients-per-round question."""
    c.description = (
        "DP-SGD: the smallest noise multiplier reaching --epsilon at --delta,\n"
        "given --sample-rate and --steps or --epochs.\n\n"
        "DP-FedAvg (user-level DP, Poisson sampling of clients): the fewest clients\n"
        "per round m reaching it, with q = m / --total-clients over --rounds and the\n"
        "noise multiplier growing with m (z = --noise-per-client x m), as in the\n"
        "TensorFlow Federated DP tutorial. One row per accountant (PLD, RDP)."
    )
    c.epilog = (
        "examples:\n"
        "  bench calibrate --epsilon 3 --sample-rate 0.004 --epochs 30\n"
        "  bench calibrate --epsilon 2 --delta 1e-5 --total-clients 3383 --rounds 100 --noise-per-client 0.01\n"
        "  bench calibrate --epsilon 2 --total-clients 3383 --rounds 100 --base-noise 0.5 --base-clients 50"
    )
    c.formatter_class = argparse.RawDescriptionHelpFormatter
    fed = c.add_argument_group("federated (DP-FedAvg) form, instead of --sample-rate/--steps/--epochs")
    fed.add_argument("--total-clients", type=_positive(int, "--total-clients"), help="clients in the population")
    fed.add_argument("--rounds", type=_positive(int, "--rounds"), help="training rounds")
    fed.add_argument(
        "--noise-per-client",
        type=_positive(float, "--noise-per-client"),
        help="noise multiplier per client in the round (z = this x clients per round)",
    )
    fed.add_argument(
        "--base-noise",
        type=_positive(float, "--base-noise"),
        help="instead of --noise-per-client: a noise multiplier that trains well at --base-clients per round",
    )
    fed.add_argument(
        "--base-clients",
        type=_positive(int, "--base-clients"),
        help="clients per round of --base-noise (noise per client = base noise / base clients)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Identical DP-SGD workloads across frameworks.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("suites", help="list the shipped suites").set_defaults(func=cmd_suites)

    r = sub.add_parser("run", help="run a suite (resumes: finished runs are skipped)")
    r.add_argument("suite", help="a suite name (see `bench suites`) or a YAML file")
    r.add_argument("--backends", help="comma-separated, e.g. jax,opacus:ghost (overrides the suite)")
    r.add_argument("--seeds", type=_seeds, help="comma-separated seeds (overrides the suite)")
    r.add_argument("--dry-run", action="store_true", help="print the runs with sigma, steps and epsilon")
    r.add_argument(
        "--probe",
        action="store_true",
        help="with --dry-run: time a few steps of each distinct workload/backend/batch size and project "
        "each run's wall time (training steps only: evaluation is not included)",
    )
    r.add_argument(
        "--probe-steps",
        type=_positive(int, "--probe-steps"),
        default=5,
        metavar="N",
        help="timed steps per probe (default 5)",
    )
    r.add_argument(
        "--probe-timeout",
        type=_positive(float, "--probe-timeout"),
        default=300.0,
        metavar="S",
        help="limit in seconds for one probe, start-up and build included (default 300)",
    )
    r.add_argument("--force", action="store_true", help="re-run runs that already have results")
    r.add_argument(
        "--retry-failed",
        action="store_true",
        help="re-run runs that did not end ok (failed, oom, timeout, diverged); not unsupported ones, "
        "which would end the same way again",
    )
    r.add_argument("--env", choices=("isolated", "current"), default="isolated", help="backend environment")
    r.add_argument("--timeout", type=float, help="per-run limit in seconds (overrides the suite)")
    r.add_argument(
        "--memory-limit",
        type=_positive(float, "--memory-limit"),
        metavar="GB",
        help="stop a worker whose processes use more resident memory (GiB) and record the run as oom "
        "(overrides the suite's memory_limit_gb; default: 90%% of the machine's memory)",
    )
    r.add_argument("--results", help="results folder (default: $BENCH_RESULTS_DIR or ./results)")
    r.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local (default): one run after another on this machine; ray: every run as a Ray task on a "
        "cluster (pip install -e '.[ray]')",
    )
    r.add_argument(
        "--address",
        metavar="auto|HOST:PORT",
        help="with --executor ray: the cluster to join (auto: the one `ray start` runs on this machine; "
        "default: $RAY_ADDRESS, else that one, else a private local Ray instance)",
    )
    r.add_argument(
        "--ray-retries",
        type=_retries,
        metavar="N",
        help="with --executor ray: times a run whose node dies is retried before it is recorded as failed (default 2)",
    )
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="one self-contained HTML report (or a Markdown summary) of a results folder")
    rep.add_argument(
        "results", nargs="?", help="results folder or Parquet file (default: $BENCH_RESULTS_DIR or ./results)"
    )
    rep.add_argument("--suite", help="only this suite's runs")
    rep.add_argument(
        "--out", type=Path, help="output file (default: reports/index.html for html, standard output for md)"
    )
    rep.add_argument("--format", choices=("html", "md"), default="html", help="html (default) or md")
    rep.set_defaults(func=cmd_report)

    sp = sub.add_parser(
        "speed",
        help="Markdown table of what DP costs per backend/variant (seconds, ratios, memory) and its speed targets",
        description="Prints one Markdown table per workload: DP and non-private seconds per epoch, DP / non-private, "
        "DP / the fastest DP and non-private, peak memory and the core's share of the epoch, then the targets of "
        "one backend:variant. --check: exit 1 unless every target is met, 2 on unusable input.",
    )
    sp.add_argument(
        "results", nargs="?", help="results folder or Parquet file (default: $BENCH_RESULTS_DIR or ./results)"
    )
    sp.add_argument("--suite", help="only this suite's runs (default: the 'speed' suite if present, else all)")
    sp.add_argument("--label", help="backend:variant whose targets are checked (default: jax's default variant)")
    sp.add_argument("--check", action="store_true", help="exit 1 if a target is missed or cannot be measured")
    sp.set_defaults(func=cmd_speed)

    cmp = sub.add_parser(
        "compare",
        help="compare results with a baseline: exit 0 if every check holds, 1 on a regression, 2 on unusable input",
    )
    cmp.add_argument("current", help="results folder or Parquet file")
    cmp.add_argument("--baseline", required=True, help="results folder, Parquet file or saved baseline name")
    cmp.add_argument("--suite", help="only this suite's runs (on both sides)")
    cmp.add_argument(
        "--max-slowdown",
        type=_fraction("--max-slowdown"),
        default=0.15,
        help="relative growth of the DP overhead (and, on the same hardware, of seconds per epoch) that fails "
        "(default 0.15)",
    )
    cmp.add_argument(
        "--max-accuracy-drop",
        type=_fraction("--max-accuracy-drop"),
        default=0.01,
        help="absolute drop of mean test accuracy that fails, if also beyond the seed spread (default 0.01)",
    )
    cmp.add_argument(
        "--max-memory-growth",
        type=_fraction("--max-memory-growth"),
        default=0.25,
        help="relative growth of peak memory that fails, same hardware only (default 0.25)",
    )
    cmp.add_argument(
        "--overhead-only",
        action="store_true",
        help="judge speed by the DP overhead ratio only; show absolute seconds and memory without judging them",
    )
    cmp.add_argument("--format", choices=("text", "md", "json"), default="text")
    cmp.add_argument("-v", "--verbose", action="store_true", help="list the checks that hold too")
    cmp.set_defaults(func=cmd_compare)

    bl = sub.add_parser("baseline", help="save or list baselines for `bench compare` (under baselines/)")
    bl.add_argument("action", choices=("save", "list"))
    bl.add_argument("name", nargs="?", help="baseline name (save)")
    bl.add_argument("results", nargs="?", help="results folder (default: $BENCH_RESULTS_DIR or ./results)")
    bl.add_argument("--suite", help="only this suite's runs")
    bl.add_argument("--root", help="baselines folder (default: the repository's baselines/)")
    bl.set_defaults(func=cmd_baseline)

    d = sub.add_parser("data", help="show which datasets are available and where")
    d.add_argument("--download", metavar="NAME", help="download mnist or cifar10 (needs a network)")
    d.set_defaults(func=cmd_data)

    for name, func, help_ in (
        ("epsilon", cmd_epsilon, "epsilon of DP-SGD (PLD and RDP)"),
        ("calibrate", cmd_calibrate, "noise multiplier (DP-SGD) or clients per round (DP-FedAvg) for a target epsilon"),
    ):
        c = sub.add_parser(name, help=help_)
        if name == "epsilon":
            c.add_argument("--sigma", type=float, required=True, help="noise multiplier")
        else:
            c.add_argument("--epsilon", type=float, required=True, help="target epsilon")
        c.add_argument("--sample-rate", type=float, required=name == "epsilon", help="q = batch size / dataset size")
        c.add_argument("--steps", type=int, help="number of steps")
        c.add_argument("--epochs", type=int, help="epochs (steps = epochs * round(1/q))")
        c.add_argument("--delta", type=float, default=1e-5)
        if name == "calibrate":
            _federated_calibrate_args(c)
        c.set_defaults(func=func)

    from bench.audit.command import add_parser as add_audit_parser

    add_audit_parser(sub)

    e = sub.add_parser("env", help="backend environments")
    e.add_argument("action", choices=("create", "list"))
    e.add_argument("backends", nargs="*", help="backends to create (default: all)")
    e.set_defaults(func=cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "probe", False) and not args.dry_run:
        parser.error("--probe only works with --dry-run")
    if getattr(args, "executor", "ray") != "ray" and (args.address or args.ray_retries is not None):
        parser.error("--address and --ray-retries need --executor ray")
    from bench.accounting import CalibrationError
    from bench.backend import UnknownBackendError
    from bench.data.loaders import DataFormatError, DataNotFoundError
    from bench.envs import EnvError
    from bench.resultset import ResultsError
    from bench.suite import SuiteError

    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
        return code
    except (SuiteError, SpecError, CalibrationError, UnknownBackendError, EnvError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `bench ... | head`: the reader left early, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
