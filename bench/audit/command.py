"""`bench audit SUITE`: measure the privacy a suite's backends deliver (see bench.audit.auditor)."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

EXIT_USAGE = 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "audit",
        help="empirical privacy audits of a suite: step audits of its DP settings, one-run audits of its "
        "workloads with an `audit:` block (resumes: audited settings are skipped)",
    )
    a.add_argument("suite", help="a suite name (see `bench suites`) or a YAML file")
    a.add_argument("--backends", help="comma-separated, e.g. jax,opacus:hooks (overrides the suite)")
    a.add_argument("--results", help="results folder (default: $BENCH_RESULTS_DIR or ./results)")
    a.add_argument("--trials", type=int, default=None, metavar="K", help="trials per step audit (default 4000)")
    a.add_argument("--no-step", action="store_true", help="skip the step audits")
    a.add_argument("--no-one-run", action="store_true", help="skip the one-run audits")
    a.add_argument("--force", action="store_true", help="re-run audits (and their training runs) already recorded")
    a.add_argument("--env", choices=("isolated", "current"), default="isolated", help="backend environment")
    a.add_argument("--timeout", type=float, help="per-run limit in seconds for one-run audits' training")
    a.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from bench.audit.auditor import DEFAULT_TRIALS, Auditor, plan_step_audits, verdict_significance
    from bench.progress import SweepProgress
    from bench.runner import Runner, SweepInterrupted, describe_run
    from bench.suite import load_suite

    trials = DEFAULT_TRIALS if args.trials is None else args.trials
    if trials < 8:
        print(f"error: --trials: got {trials}, expected an integer >= 8", flush=True)
        return EXIT_USAGE
    suite = load_suite(args.suite, backends=args.backends)
    results = Path(args.results) if args.results else _default_results()
    steps = [] if args.no_step else plan_step_audits(suite, trials)
    audited_runs = [] if args.no_one_run else [r for r in suite.runs if r.audit is not None]
    if not steps and not audited_runs:
        print(f"error: suite {suite.name!r} has nothing to audit (no DP setting, no workload with an `audit:` block)")
        return EXIT_USAGE
    judged = len(steps) + sum(1 for r in audited_runs if r.dp.enabled)  # the controls are not counted
    significance = verdict_significance(judged)
    print(
        f"suite {suite.name!r}: {len(steps)} step audits ({trials} trials each, each with a weaker-claim control), "
        f"{len(audited_runs)} one-run audits; each verdict at significance {significance:.2g} (1% over "
        f"{judged} audits); results in {results}"
    )
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with SweepProgress(len(audited_runs)) as progress:
            runner = Runner(
                results, env=args.env, timeout=args.timeout, log=progress.log, on_progress=progress.on_event
            )
            progress.describe = describe_run
            auditor = Auditor(runner, significance=significance, log=progress.log)
            outcomes = auditor.step_audits(steps, force=args.force)
            if audited_runs:
                _, one_run = auditor.one_run_audits(suite, force=args.force)
                outcomes += one_run
    except (KeyboardInterrupt, SweepInterrupted) as e:
        print(f"{e or 'interrupted'}: the audits recorded so far are kept; the same command resumes the rest.")
        return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    bad = [o for o in outcomes if not o.ok]
    minutes, seconds = divmod(time.perf_counter() - started, 60)
    controls = sum(1 for o in outcomes if o.row.get("control"))
    print(
        f"{len(outcomes)} audits ({controls} controls) in {minutes:.0f}m{seconds:02.0f}s: "
        + ("every audit consistent, every control a violation" if not bad else f"{len(bad)} not as expected:")
    )
    for o in bad:
        r = o.row
        what = "control" if r.get("control") else "audit"
        print(
            f"  {what} {r['audit_kind']} {r['backend']}:{r['variant']} {r['workload']}: "
            f"{r.get('status')} {r.get('verdict') or ''} {r.get('error') or ''}".rstrip()
        )
    return 0 if not bad else 1


class _Terminated(KeyboardInterrupt):
    pass


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated(f"stopped by {signal.Signals(signum).name}")


def _default_results() -> Path:
    import os

    return Path(os.environ.get("BENCH_RESULTS_DIR", "results"))
