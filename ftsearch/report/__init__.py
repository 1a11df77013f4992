"""Study reports: a leaderboard in the terminal and a self-contained HTML report of one study.

Everything is read back from where a search left it: the Optuna storage (trials, states, values,
params) and MLflow (learning curves, the baseline on the parent run, test metrics, the registered
champion and the test figures and tables of its run). Nothing here trains or changes a model; the only writes are
the HTML file and its copy on the study's parent run (``report.html``).

A study can be reported on at any time, half-run or still running: every part that has no data
yet says so in a sentence instead of failing.

- ``collect``: gathering from Optuna and MLflow into a ``StudyReport``;
- ``terminal``: ``print_report`` (rich);
- ``html``: ``render_html`` through the Jinja2 template in ``templates/``;
- ``views``: what both say (counts, the trials by adaptation method, the baseline comparison,
  the registered model's sentence, test tables as cells and captions from artifact names);
- this module: ``make_report``, which gathers, renders and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ftsearch import settings, tracking
from ftsearch.config import StudyConfig
from ftsearch.errors import FtsearchError
from ftsearch.formatting import format_metric, format_seconds, format_value
from ftsearch.report.collect import (
    ALIASES,
    FIGURE_SUFFIX,
    TABLE_SUFFIX,
    Baseline,
    ModelSummary,
    StudyReport,
    TrialRow,
    collect,
    find_study,
    metrics_on_test,
    study_argument,
)
from ftsearch.report.html import ROUGH_IMPORTANCES, learning_curves_figure, render_html
from ftsearch.report.terminal import TABLE_ROWS, print_report
from ftsearch.report.views import (
    TableView,
    artifact_caption,
    comparison_gaps,
    comparison_rows,
    format_cell,
    model_sentence,
    table_view,
)

REPORT_ARTIFACT = "report.html"

__all__ = [
    "ALIASES",
    "FIGURE_SUFFIX",
    "REPORT_ARTIFACT",
    "ROUGH_IMPORTANCES",
    "TABLE_ROWS",
    "TABLE_SUFFIX",
    "Baseline",
    "ModelSummary",
    "ReportResult",
    "StudyReport",
    "TableView",
    "TrialRow",
    "artifact_caption",
    "collect",
    "comparison_gaps",
    "comparison_rows",
    "default_output",
    "find_study",
    "format_cell",
    "format_metric",
    "format_seconds",
    "format_value",
    "learning_curves_figure",
    "make_report",
    "metrics_on_test",
    "model_sentence",
    "print_report",
    "render_html",
    "study_argument",
    "table_view",
]


@dataclass(frozen=True)
class ReportResult:
    """What ``make_report`` did, for the CLI to print and tests to check."""

    report: StudyReport
    path: Path
    logged_to: str | None  # the parent run that got report.html, None when it could not


def default_output(study_name: str) -> Path:
    """``<state dir>/reports/<optuna study name>.html``."""
    return settings.state_dir() / "reports" / f"{study_name}.html"


def make_report(config: StudyConfig, output: Path | None = None, storage_url: str | None = None) -> ReportResult:
    """Gather the study, write its HTML report to ``output`` (default: ``default_output``) and log
    it as ``report.html`` on the study's parent run."""
    report = collect(config, storage_url)
    page = render_html(report)
    path = Path(output) if output is not None else default_output(report.study_name)
    if path.is_dir():
        path = path / f"{report.study_name}.html"
    _write(path, page)
    logged_to = None
    if report.parent_run_id is not None:
        try:
            tracking.client().log_text(report.parent_run_id, page, REPORT_ARTIFACT)
            logged_to = report.parent_run_id
        except Exception as err:  # noqa: BLE001 - the file on disk is the report; the copy is a bonus
            report.notes.append(f"could not log {REPORT_ARTIFACT} to run {report.parent_run_id}: {err}")
    return ReportResult(report, path.resolve(), logged_to)


def _write(path: Path, page: str) -> None:
    """Written beside, then renamed: an interrupted write never leaves half a report."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, path)
    except OSError as err:
        raise FtsearchError(f"cannot write the report to {path}: {err.strerror or err}") from None
