"""`bench audit`: plan a suite's audits, run them (resumable), score them and write one record per audit.

- Step audits, one per distinct DP setting of the suite (model, input shape, sigma, C, delta) and backend/variant:
  the trials run in the backend's environment (`bench.audit.step_worker`), the core scores them here. Each also
  yields a control: the same trials judged against a claim 4x weaker than the truth (sigma claimed 4x larger),
  which a working audit must reject.
- One-run audits, for the workloads with an `audit:` block: their runs go through the ordinary sweep
  (`Runner.run_suite`: locks, resume, results), and the canary scores in each run's last row are scored here.
  A non-private run of such a workload is a control: judged against the smallest epsilon of the workload's DP
  runs, it must be a violation.

A verdict is `violation` when a one-sided lower confidence bound exceeds the claim. A suite runs dozens of
audits, so each verdict is a test at significance FAMILY_ALARM / N, N the number of audits of the invocation that
are not controls (Bonferroni; a step audit splits its share between its two tests): the chance that any correct
audit of the suite is called a violation stays under 1%. `verdict_significance` computes it; each row records
the significance it was judged at. The bounds the rows report are 95% ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.audit import stats
from bench.audit.records import AuditKind, AuditStatus, Verdict, audit_path, write_audit
from bench.envs import EnvError
from bench.results import read_status, read_table, result_path
from bench.runner import Outcome, Runner, identity_columns, provenance, worker_env
from bench.spec import DatasetSpec, DPConfig, OptimizerSpec, PerfFlags, RunSpec, TrainConfig
from bench.suite import DATASET_INFO, SYNTHETIC_DEFAULTS, Suite

REPORTED_SIGNIFICANCE = 0.05  # the bounds the rows and reports show are 95% ones
FAMILY_ALARM = 0.01  # the chance of any false alarm among a suite's correct audits
DEFAULT_TRIALS = 4000
WEAKER_CLAIM = 4.0  # the control's claimed sigma, over the real one
STEP_REAL_ROWS = 7  # the fixed batch B; the expected batch size is B + 1 (the canary)
STEP_DATASET_SIZE = 1000  # only the sample rate's denominator: one step is audited, not the sampling
STEP_TIMEOUT_S = 3600.0
# A step on 8 rows gains nothing from threads, and under load oversubscribed ones hurt: Opacus' trial took 22 ms
# with one thread and 196 ms with two on the 2-core machine while another process ran.
STEP_THREADS = 1


def verdict_significance(audits: int) -> float:
    """Each verdict's significance when `audits` audits (controls not counted) are judged together."""
    return FAMILY_ALARM / max(1, audits)


def geometry(dataset: DatasetSpec) -> tuple[tuple[int, int, int], int]:
    """The input shape (H, W, C) and number of classes of a dataset, without loading it."""
    if dataset.name == "synthetic":
        _, _, shape, classes = SYNTHETIC_DEFAULTS
        return dataset.shape or shape, dataset.num_classes or classes
    _, _, shape, classes = DATASET_INFO[dataset.name]
    return shape, classes


def canary_copies(noise_multiplier: float) -> int:
    """Identical canaries per step-audit trial: k copies make mu = k / sigma, kept near 1, where K trials measure
    mu to about 3.4% / sqrt(K / 4000) (its standard error grows as 2 / (mu sqrt(K)) for small mu)."""
    return max(1, round(noise_multiplier))


@dataclass(frozen=True, kw_only=True)
class StepAudit:
    """One step audit: a DP setting of a workload on one backend/variant."""

    run: RunSpec  # the audited step: synthetic inputs of the workload's shape, plain SGD, sigma and C of the setting
    workload_dataset: str
    trials: int
    copies: int

    @property
    def audit_id(self) -> str:
        blob = json.dumps(
            {"kind": "step", "run": self.run.run_id, "trials": self.trials, "copies": self.copies}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return (
            f"step audit {self.run.backend_label} {self.run.workload} {self.run.model} "
            f"sigma={self.run.dp.noise_multiplier:g}"
        )


def plan_step_audits(suite: Suite, trials: int) -> list[StepAudit]:
    """One step audit per distinct (backend/variant, model, input geometry, sigma, C, delta) of the suite's DP runs."""
    audits: dict[str, StepAudit] = {}
    for run in suite.runs:
        if run.federated is not None or not run.dp.enabled or not run.dp.noise_multiplier:
            continue
        shape, classes = geometry(run.dataset)
        sigma = run.dp.noise_multiplier
        step = RunSpec(
            suite=run.suite,
            workload=run.workload,
            dataset=DatasetSpec(name="synthetic", shape=shape, num_classes=classes),
            model=run.model,
            train=TrainConfig(
                epochs=1, batch_size=STEP_REAL_ROWS + 1, optimizer=OptimizerSpec(name="sgd", learning_rate=1.0)
            ),
            dp=DPConfig(noise_multiplier=sigma, max_grad_norm=run.dp.max_grad_norm, delta=run.dp.delta),
            backend=run.backend,
            variant=run.variant,
            seed=0,
            perf=PerfFlags(threads=STEP_THREADS),
            dataset_size=STEP_DATASET_SIZE,
        )
        audit = StepAudit(run=step, workload_dataset=run.dataset.name, trials=trials, copies=canary_copies(sigma))
        audits.setdefault(audit.audit_id, audit)
    return list(audits.values())


def _base_row(kind: AuditKind, run: RunSpec, audit_id: str, significance: float) -> dict:
    return {
        "audit_id": audit_id,
        "audit_kind": kind.value,
        **identity_columns(run),
        "noise_multiplier": run.dp.noise_multiplier if run.dp.enabled else None,
        "max_grad_norm": run.dp.max_grad_norm if run.dp.enabled else None,
        "delta": run.dp.delta,
        "significance": significance,
        "control": False,
        "control_kind": "",
        "status": AuditStatus.OK.value,
        "error": "",
        **provenance(),
        "finished_at": datetime.now(UTC),
    }


def score_step(
    audit: StepAudit, scores: np.ndarray, included: np.ndarray, claimed_sigma: float, significance: float
) -> dict:
    """The measured fields of a step audit judged against a claimed sigma (the truth, or the control's): a
    violation when mu's lower bound or the assumption-free epsilon bound (each at significance / 2) exceeds it."""
    k = audit.copies
    s_in, s_out = scores[included], scores[~included]
    fit = stats.fit_mu(s_in, s_out, significance / 2)
    bound = stats.epsilon_split(s_in, s_out, audit.run.dp.delta, REPORTED_SIGNIFICANCE)
    strict = stats.epsilon_split(s_in, s_out, audit.run.dp.delta, significance / 2)
    mu_claim = k / claimed_sigma  # of the canary group
    claim = stats.gaussian_epsilon(mu_claim, audit.run.dp.delta)
    violated = fit.lower_bound > mu_claim or strict.epsilon > claim
    return {
        "claimed_noise_multiplier": claimed_sigma,
        "epsilon": claim,
        "epsilon_lower": bound.epsilon,
        "epsilon_ceiling": bound.ceiling,
        "mu_hat": fit.mu / k,
        "mu_low": fit.low / k,
        "mu_high": fit.high / k,
        "mu_claim": 1 / claimed_sigma,
        "trials": audit.trials,
        "canary_copies": k,
        "verdict": (Verdict.VIOLATION if violated else Verdict.CONSISTENT).value,
    }


def run_step_audit(
    audit: StepAudit, python: str, logs: Path, significance: float, target: str | None = None
) -> tuple[dict, dict | None]:
    """Run the trials in the backend's environment and score them: (the audit row, the control row or None)."""
    run = audit.run
    shape, classes = geometry(run.dataset)
    base = _base_row(AuditKind.STEP, run, audit.audit_id, significance)
    base["dataset"] = audit.workload_dataset
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        request = Path(tmp) / "request.json"
        output = Path(tmp) / "trials.npz"
        request.write_text(
            json.dumps(
                {
                    "run": run.to_dict(),
                    "input_shape": list(shape),
                    "num_classes": classes,
                    "real_rows": STEP_REAL_ROWS,
                    "copies": audit.copies,
                    "physical_batch_size": STEP_REAL_ROWS + audit.copies,
                    "trials": audit.trials,
                    "output": str(output),
                    "target": target,
                }
            )
        )
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"audit-{audit.audit_id}.log"
        with open(log, "w") as f:
            try:
                proc = subprocess.run(
                    [python, "-m", "bench.audit.step_worker", str(request)],
                    env=worker_env(run),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    timeout=STEP_TIMEOUT_S,
                )
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        seconds = time.perf_counter() - t0
        error_file = output.with_suffix(".error.txt")
        if code != 0 or not output.exists():
            if error_file.exists():
                error = error_file.read_text()
            elif code is None:
                error = f"timed out after {STEP_TIMEOUT_S:.0f} s"
            else:
                error = f"exited with code {code}: " + "\n".join(log.read_text().splitlines()[-15:])
            failed = {**base, "status": AuditStatus.FAILED.value, "error": error, "seconds": seconds}
            failed.update(verdict=Verdict.NONE.value, trials=audit.trials, canary_copies=audit.copies)
            return failed, None
        with np.load(output) as f:
            scores, included = f["scores"], f["included"].astype(bool)
    sigma = run.dp.noise_multiplier
    row = {**base, **score_step(audit, scores, included, sigma, significance), "seconds": seconds}
    control = {
        **base,
        **score_step(audit, scores, included, WEAKER_CLAIM * sigma, significance),
        "audit_id": f"{audit.audit_id}-weak-claim",
        "control": True,
        "control_kind": f"claim {WEAKER_CLAIM:g}x weaker (sigma {WEAKER_CLAIM * sigma:g} claimed)",
        "seconds": 0.0,
    }
    return row, control


def score_one_run(run: RunSpec, result: Path, claim: float | None, control: bool, significance: float) -> dict:
    """A one-run audit's row from the canary scores that its training run recorded (its last row)."""
    audit_id = f"{run.run_id}-one-run"
    base = _base_row(AuditKind.ONE_RUN, run, audit_id, significance)
    base["run_id"] = run.run_id
    table = read_table(result).to_pandas()
    last = table.iloc[-1]
    scores, included = last.get("canary_scores"), last.get("canary_included")
    audit = run.audit
    if scores is None or included is None or len(scores) != audit.canaries:
        return {**base, "status": AuditStatus.FAILED.value, "error": "the run recorded no canary scores"}
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    k_in = audit.guesses // 2
    guesses = stats.top_bottom_guesses(scores, included, k_in, audit.guesses - k_in)
    m, r, v, delta = audit.canaries, guesses.guesses, guesses.correct, run.dp.delta
    lower = stats.epsilon_one_run(m, r, v, delta, REPORTED_SIGNIFICANCE)
    strict = stats.epsilon_one_run(m, r, v, delta, significance)
    if claim is None or math.isnan(claim):
        verdict = Verdict.NONE
    else:
        verdict = Verdict.VIOLATION if strict > claim else Verdict.CONSISTENT
    return {
        **base,
        "epsilon": claim,
        "epsilon_lower": lower,
        "epsilon_ceiling": stats.one_run_ceiling(m, r, delta, REPORTED_SIGNIFICANCE),
        "canary_kind": audit.kind,
        "canaries": m,
        "guesses": r,
        "correct": v,
        "verdict": verdict.value,
        "control": control,
        "control_kind": "trained without DP, judged against the workload's smallest DP epsilon" if control else "",
        "versions": str(last.get("versions") or ""),
        "seconds": 0.0,
    }


def _final_epsilon(result: Path) -> float | None:
    try:
        eps = read_table(result, columns=["epsilon"]).column("epsilon").to_pylist()
    except Exception:
        return None
    return eps[-1] if eps and eps[-1] is not None else None


@dataclass(frozen=True, kw_only=True)
class AuditOutcome:
    row: dict
    skipped: bool = False

    @property
    def ok(self) -> bool:
        """A correct audit is `consistent`; a control is built to be a `violation`."""
        expected = Verdict.VIOLATION if self.row.get("control") else Verdict.CONSISTENT
        return self.row.get("status") == AuditStatus.OK and self.row.get("verdict") == expected


def describe(row: dict) -> str:
    """One line: what was audited and what was found."""
    if row.get("status") != AuditStatus.OK:
        return f"failed: {str(row.get('error', '')).splitlines()[0] if row.get('error') else ''}"
    claim = row.get("epsilon")
    claim_text = f"{claim:.3g}" if claim is not None and not math.isnan(claim) else "none"
    text = f"eps_lower {row['epsilon_lower']:.3g} (ceiling {row['epsilon_ceiling']:.3g}) vs claim {claim_text}"
    if row["audit_kind"] == AuditKind.STEP:
        sigma = row["noise_multiplier"]
        text = (
            f"mu*sigma {row['mu_hat'] * sigma:.3f} [{row['mu_low'] * sigma:.3f}, {row['mu_high'] * sigma:.3f}], " + text
        )
    else:
        text = f"{row['correct']}/{row['guesses']} guesses right of {row['canaries']} canaries, " + text
    return f"{row['verdict'] or 'no claim'}: {text}"


class Auditor:
    """Runs a suite's audits into a results folder; what already has a record is skipped unless `force`."""

    def __init__(
        self,
        runner: Runner,
        *,
        significance: float,
        log: Callable[[str], None] = print,
        target: str | None = None,
    ):
        self.runner = runner
        self.significance = significance  # of each verdict (see verdict_significance)
        self.log = log
        self.target = target  # tests: a backend class ("module:Class") to audit in the named backend's environment

    def _record(self, row: dict) -> AuditOutcome:
        write_audit(audit_path(self.runner.results_dir, row["suite"], row["audit_id"]), row)
        return AuditOutcome(row=row)

    def _existing(self, suite: str, audit_id: str, force: bool) -> dict | None:
        path = audit_path(self.runner.results_dir, suite, audit_id)
        if force or not path.exists() or read_status(path) != AuditStatus.OK:
            return None
        return read_table(path).to_pylist()[0]

    def step_audits(self, audits: list[StepAudit], *, force: bool = False) -> list[AuditOutcome]:
        outcomes: list[AuditOutcome] = []
        for i, audit in enumerate(audits, 1):
            head = f"[{i}/{len(audits)}] {audit.label}"
            done = self._existing(audit.run.suite, audit.audit_id, force)
            control = self._existing(audit.run.suite, f"{audit.audit_id}-weak-claim", force)
            if done is not None and control is not None:
                self.log(f"{head}: already audited, {describe(done)} (use --force to re-run)")
                outcomes += [AuditOutcome(row=done, skipped=True), AuditOutcome(row=control, skipped=True)]
                continue
            self.log(f"{head}: {audit.trials} trials, canary of {audit.copies} ...")
            try:
                python = self.runner.python_for(audit.run.backend)
            except EnvError as e:
                row = _base_row(AuditKind.STEP, audit.run, audit.audit_id, self.significance)
                row["status"] = AuditStatus.FAILED.value
                row.update(error=str(e), verdict=Verdict.NONE.value, dataset=audit.workload_dataset)
                outcomes.append(self._record(row))
                self.log(f"{head}: {describe(row)}")
                continue
            logs = result_path(self.runner.results_dir, audit.run.suite, "x").parent / "_logs"
            row, control_row = run_step_audit(audit, python, logs, self.significance, self.target)
            outcomes.append(self._record(row))
            self.log(f"{head}: {describe(row)} ({row['seconds']:.0f} s)")
            if control_row is not None:
                outcomes.append(self._record(control_row))
                self.log(f"{head}, control ({control_row['control_kind']}): {describe(control_row)}")
        return outcomes

    def one_run_audits(
        self, suite: Suite, *, force: bool = False, retry_failed: bool = False
    ) -> tuple[list[Outcome], list[AuditOutcome]]:
        runs = [run for run in suite.runs if run.audit is not None]
        if not runs:
            return [], []
        self.log(f"one-run audits: {len(runs)} training runs with canaries")
        outcomes = self.runner.run_suite(
            dataclasses.replace(suite, runs=tuple(runs)), force=force, retry_failed=retry_failed
        )
        by_id = {o.run.run_id: o for o in outcomes}
        claims = _smallest_dp_epsilon(runs, self.runner.results_dir)
        audits: list[AuditOutcome] = []
        for run in runs:
            outcome = by_id[run.run_id]
            path = result_path(self.runner.results_dir, run.suite, run.run_id)
            head = f"one-run audit {run.backend_label} {run.workload} " + (
                f"sigma={run.dp.noise_multiplier:g}" if run.dp.enabled else "non-private"
            )
            if outcome.status != "ok":
                row = _base_row(AuditKind.ONE_RUN, run, f"{run.run_id}-one-run", self.significance)
                row["run_id"] = run.run_id
                row.update(status=AuditStatus.FAILED.value, error=f"training run {outcome.status}: {outcome.error}")
                row.update(verdict=Verdict.NONE.value)
            elif run.dp.enabled:
                row = score_one_run(run, path, _final_epsilon(path), False, self.significance)
            else:
                row = score_one_run(run, path, claims.get((run.workload, run.seed)), True, self.significance)
            audits.append(self._record(row))
            self.log(f"{head}: {describe(row)}")
        return outcomes, audits


def _smallest_dp_epsilon(runs: Iterable[RunSpec], results_dir: Path) -> dict[tuple[str, int], float]:
    """Per (workload, seed): the smallest final epsilon of its DP runs, the claim a non-private control is held to."""
    claims: dict[tuple[str, int], float] = {}
    for run in runs:
        if not run.dp.enabled:
            continue
        eps = _final_epsilon(result_path(results_dir, run.suite, run.run_id))
        if eps is not None:
            key = (run.workload, run.seed)
            claims[key] = min(eps, claims.get(key, math.inf))
    return claims
