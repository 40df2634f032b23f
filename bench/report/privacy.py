"""The report's "measured privacy" table: a workload's audit records as text cells, for HTML and Markdown alike."""

from __future__ import annotations

import math

import pandas as pd

from bench.audit.records import AuditKind, AuditStatus

HEADERS = [
    "backend:variant",
    "audit",
    "σ",
    "claimed ε",
    "ε lower bound (95%)",
    "ceiling",
    "μ̂·σ [95% CI]",
    "guesses right",
    "verdict",
]
NOTE = (
    "Claimed ε: the accountant's (one-run audits: the run's final ε; step audits: one Gaussian step of the canary). "
    "The lower bound is what the audit measured; the ceiling is the most its sample size could show. "
    "μ̂·σ is 1 for a correct Gaussian step. A control is built to fail: its verdict should be a violation."
)


def _num(value: object, spec: str = ".3g") -> str:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "–"
    if math.isnan(x):
        return "–"
    return "∞" if math.isinf(x) else format(x, spec)


def _audit_name(row: pd.Series) -> str:
    name = "step" if row["audit_kind"] == AuditKind.STEP else "one run"
    if row["audit_kind"] == AuditKind.STEP and pd.notna(row.get("canary_copies")) and row["canary_copies"] > 1:
        name += f" (canary ×{int(row['canary_copies'])})"
    if row["audit_kind"] == AuditKind.ONE_RUN and isinstance(row.get("canary_kind"), str):
        name += f" ({int(row['canaries'])} {row['canary_kind']} canaries)" if pd.notna(row.get("canaries")) else ""
    if bool(row.get("control")):
        name += f" — control: {row['control_kind']}"
    return name


def audit_rows(audits: pd.DataFrame) -> list[list[str]]:
    """One list of cells per audit record (unescaped text), controls after the audits they belong to."""
    if audits.empty:
        return []
    frame = audits.assign(
        _label=audits["backend"].astype(str) + ":" + audits["variant"].astype(str),
        _control=audits["control"].fillna(False).astype(bool),
        _sigma=audits["noise_multiplier"].fillna(-1.0),
    ).sort_values(["_label", "audit_kind", "_sigma", "_control"], kind="stable")
    rows = []
    for _, r in frame.iterrows():
        sigma = r["noise_multiplier"]
        if r["status"] != AuditStatus.OK:
            error = str(r.get("error") or "").splitlines()
            rows.append(
                [
                    r["_label"],
                    _audit_name(r),
                    _num(sigma),
                    "–",
                    "–",
                    "–",
                    "–",
                    "–",
                    f"failed: {error[0] if error else ''}",
                ]
            )
            continue
        mu = "–"
        if pd.notna(r.get("mu_hat")) and pd.notna(sigma):
            mu = f"{r['mu_hat'] * sigma:.3f} [{r['mu_low'] * sigma:.3f}, {r['mu_high'] * sigma:.3f}]"
        guesses = f"{int(r['correct'])}/{int(r['guesses'])}" if pd.notna(r.get("guesses")) else "–"
        claimed = r.get("claimed_noise_multiplier")
        sigma_text = "non-private" if not bool(r.get("dp")) else _num(sigma)
        if pd.notna(claimed) and pd.notna(sigma) and not math.isclose(claimed, sigma):
            sigma_text += f" (claimed {_num(claimed)})"
        rows.append(
            [
                r["_label"],
                _audit_name(r),
                sigma_text,
                _num(r.get("epsilon")),
                _num(r.get("epsilon_lower")),
                _num(r.get("epsilon_ceiling")),
                mu,
                guesses,
                str(r.get("verdict") or "no claim"),
            ]
        )
    return rows
