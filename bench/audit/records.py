"""The audit record: one Parquet row per audit, its versioned schema, and reading it back.

Audit rows live beside the runs they audit, in `<results>/<suite>/_audit/<audit_id>.parquet`. The `_` keeps them
out of every reader of run results (bench's and pyarrow's dataset discovery skip `_` folders), since an audit row
has no epochs; `read_audits` reads them.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import pandas as pd
import pyarrow as pa

from bench.results import SCHEMA, read_table, suite_folder, write_rows

AUDIT_SCHEMA_VERSION = 1
AUDIT_FOLDER = "_audit"


class AuditKind(StrEnum):
    STEP = "step"  # white-box: trials of one DP step with and without a canary
    ONE_RUN = "one-run"  # black-box: canaries in one ordinary training run


class Verdict(StrEnum):
    CONSISTENT = "consistent"  # the audit found no more leakage than the claim allows
    VIOLATION = "violation"  # the lower confidence bound exceeds the claim
    NONE = ""  # no verdict: the audit failed, or there was no claim to test


class AuditStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"


AUDIT_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("audit_id", pa.string()),
        ("audit_kind", pa.string()),  # AuditKind
        # what was audited: the columns of a run's identity (bench.runner.identity_columns), typed as in SCHEMA
        *(SCHEMA.field(name) for name in ("suite", "workload", "dataset", "model", "backend", "variant", "seed")),
        ("run_id", pa.string()),  # one-run audits: the training run whose canaries were scored
        # the claim
        SCHEMA.field("dp"),
        ("noise_multiplier", pa.float64()),  # the sigma the backend ran with
        ("claimed_noise_multiplier", pa.float64()),  # the sigma the claim assumes (4x larger for that control)
        ("max_grad_norm", pa.float64()),
        ("delta", pa.float64()),
        ("epsilon", pa.float64()),  # the claimed epsilon at delta
        # what was measured
        ("epsilon_lower", pa.float64()),  # the 95% lower confidence bound on epsilon
        ("epsilon_ceiling", pa.float64()),  # the largest bound this audit's sample size could show
        ("mu_hat", pa.float64()),  # step audits: Gaussian-DP mu per canary example, with its 95% interval
        ("mu_low", pa.float64()),
        ("mu_high", pa.float64()),
        ("mu_claim", pa.float64()),
        ("trials", pa.int64()),  # step audits: trials, and canary copies (the audited group)
        ("canary_copies", pa.int64()),
        ("canary_kind", pa.string()),  # one-run audits: canaries, guesses made, guesses right
        ("canaries", pa.int64()),
        ("guesses", pa.int64()),
        ("correct", pa.int64()),
        ("significance", pa.float64()),  # of the verdict's one-sided tests (corrected for a suite of audits)
        ("verdict", pa.string()),  # Verdict
        ("control", pa.bool_()),  # a control built to fail: its verdict should be `violation`
        ("control_kind", pa.string()),
        ("status", pa.string()),  # AuditStatus
        ("error", pa.string()),
        ("seconds", pa.float64()),
        ("versions", pa.string()),
        ("hardware", pa.string()),
        ("git_commit", pa.string()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def audit_path(results_dir: Path, suite: str, audit_id: str) -> Path:
    return Path(results_dir) / suite_folder(suite) / AUDIT_FOLDER / f"{audit_id}.parquet"


def write_audit(path: Path, row: dict) -> None:
    """Atomically, like a run's result (a killed writer leaves the previous file or none)."""
    write_rows(path, [row], AUDIT_SCHEMA, AUDIT_SCHEMA_VERSION)


def read_audits(results_dir: Path | str, *, suite: str | None = None) -> pd.DataFrame:
    """Every readable audit row under a results folder (or its suite's folder), in the current schema's columns.

    A file of a newer schema version, or one that is not an audit row, is skipped: audits are an addition to a
    report, never a reason for it to fail.
    """
    root = Path(results_dir)
    files = sorted(p for p in root.rglob(f"{AUDIT_FOLDER}/*.parquet") if not p.name.startswith("."))
    frames = []
    for f in files:
        try:
            table = read_table(f)
        except (OSError, pa.ArrowException):
            continue
        names = set(table.column_names)
        if not {"audit_id", "audit_kind", "status"} <= names:
            continue
        version = table.column("schema_version")[0].as_py() if "schema_version" in names else 0
        if version is not None and version > AUDIT_SCHEMA_VERSION:
            continue
        columns = {}
        for field in AUDIT_SCHEMA:
            if field.name in names:
                try:
                    columns[field.name] = table.column(field.name).cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    break
            else:
                columns[field.name] = pa.nulls(table.num_rows, field.type)
        else:
            frames.append(pa.table(columns).to_pandas())
    if not frames:
        return AUDIT_SCHEMA.empty_table().to_pandas()
    frame = pd.concat(frames, ignore_index=True)
    if suite is not None:
        frame = frame[frame["suite"] == suite]
    return frame.reset_index(drop=True)
