"""`bench report`: results folder -> one self-contained HTML page or a Markdown summary."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from bench.report.model import Report, build
from bench.resultset import ResultsError, load_results

Format = Literal["html", "md"]

__all__ = ["Format", "Report", "ResultsError", "make_report", "render"]


def make_report(results: Path | str, *, suite: str | None = None) -> Report:
    """The report of a results folder (or one result file), with the audit records `bench audit` left there."""
    from bench.audit.records import read_audits

    path = Path(results)
    audits = read_audits(path, suite=suite) if path.is_dir() else None
    return build(load_results(results, suite=suite), audits)


def render(report: Report, fmt: Format) -> str:
    if fmt == "html":
        from bench.report import html

        return html.render(report)
    from bench.report import markdown

    return markdown.render(report)
