"""`bench report`: results folder -> one self-contained HTML page or a Markdown summary."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from bench.report.model import Report, build
from bench.resultset import ResultsError, load_results

Format = Literal["html", "md"]

__all__ = ["Format", "Report", "ResultsError", "make_report", "render"]


def make_report(results: Path | str, *, suite: str | None = None) -> Report:
    return build(load_results(results, suite=suite))


def render(report: Report, fmt: Format) -> str:
    if fmt == "html":
        from bench.report import html

        return html.render(report)
    from bench.report import markdown

    return markdown.render(report)
