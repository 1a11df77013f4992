"""What the terminal and the HTML report both say: the trial counts line, the params split into
columns and constants, state labels, the baseline comparison, the sentence on the registered
model and its test tables as cells. Plain strings; each renderer lays them out (and the HTML
template escapes them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftsearch.formatting import MISSING, format_metric
from ftsearch.report.collect import TEST_PREFIX, StudyReport, TrialRow, study_argument


def counts_text(report: StudyReport) -> str:
    """``2 complete, 1 pruned``, or ``no trials yet``."""
    return ", ".join(f"{n} {state.lower()}" for state, n in report.counts.items()) or "no trials yet"


def split_params(rows: list[TrialRow]) -> tuple[list[str], dict[str, Any]]:
    """(params that differ between the rows, params every row shares with its value).

    A constant column says nothing about why one trial beat another; it is listed once instead.
    Rows without the param (a trial that failed before sampling it) do not make it vary. With a
    single row nothing is split off, so its params are still shown as columns.
    """
    names = list(dict.fromkeys(name for row in rows for name in row.params))
    if len(rows) < 2:
        return names, {}
    constant = {}
    for name in names:
        values = {repr(row.params[name]): row.params[name] for row in rows if name in row.params}
        if len(values) == 1:
            constant[name] = next(iter(values.values()))
    return [n for n in names if n not in constant], constant


def ranking_text(report: StudyReport) -> str:
    """``highest first`` or ``lowest first``: which way the leaderboard ranks the study's metric."""
    return "highest first" if report.maximize else "lowest first"


def state_label(row: TrialRow) -> str:
    if row.state == "PRUNED":
        return f"PRUNED at epoch {row.epochs}" if row.epochs else "PRUNED"
    return row.state


def comparison_rows(report: StudyReport) -> list[tuple[str, str, str]]:
    """(label, val metric, test metric) for the baseline, the best trial and their difference,
    as far as each exists. The difference is taken so that positive means fine-tuning did better
    whichever way the metric goes (for rmse: baseline − fine-tuned), and its label says which."""
    rows = []
    baseline, best = report.baseline, report.best
    best_test = report.best_test.get(f"test_{report.metric}")
    if baseline is not None:
        rows.append((f"classical baseline: {baseline.name}", format_metric(baseline.val), format_metric(baseline.test)))
    if best is not None:
        rows.append((f"best fine-tuned trial ({best.number})", format_metric(best.value), format_metric(best_test)))
    if baseline is not None and best is not None:
        if report.maximize:
            rows.append(("fine-tuned − baseline", _difference(best.value, baseline.val),
                         _difference(best_test, baseline.test)))
        else:
            rows.append(("baseline − fine-tuned", _difference(baseline.val, best.value),
                         _difference(baseline.test, best_test)))
    return rows


def _difference(a: float | None, b: float | None) -> str:
    return format_metric(None if a is None or b is None else a - b, signed=True)


def comparison_gaps(report: StudyReport) -> list[str]:
    """Sentences saying which side of the baseline comparison is missing, if any."""
    gaps = []
    if report.baseline is None:
        gaps.append("No classical baseline was logged on the study's parent run.")
    if report.best is None:
        gaps.append("No trial has completed yet, so there is no fine-tuned model to compare.")
    elif f"test_{report.metric}" not in report.best_test:
        gaps.append("The best trial has not been scored on the test split yet (that happens when the search ends).")
    return gaps


def model_sentence(report: StudyReport) -> str:
    """One sentence on the registered champion (or candidate) and its test metrics."""
    model = report.model
    if model is None:
        return (f"no registered model {report.config.registered_model!r} with alias champion or candidate yet "
                "(a search registers its best trial when it ends)")
    tests = ", ".join(f"{k} {format_metric(v)}" for k, v in model.test.items()) or "no test metrics tagged"
    origin = f"trial {model.trial_number} of study {model.optuna_study or '?'}"
    if model.optuna_study and model.optuna_study != report.study_name:
        origin += " (another generation than this report's)"
    hint = "" if model.alias == "champion" else f"; no champion yet: `ftsearch promote {study_argument(report.config)}`"
    return f"{model.alias}: {model.name} v{model.version} from {origin}: {tests}{hint}"


def model_metrics(report: StudyReport) -> dict[str, float]:
    """The registered model's validation metric (when tagged) and every test metric it carries."""
    model = report.model
    if model is None:
        return {}
    return ({f"val_{report.metric}": model.val} if model.val is not None else {}) | model.test


TABLE_DECIMALS = 3  # floats in test tables (precision, recall, thresholds...)


@dataclass(frozen=True)
class TableView:
    """A test table as cells: ``head`` is every column in order of first appearance, ``left`` the
    text columns (aligned left), ``hidden`` how many rows were left out after ``rows``."""

    name: str
    caption: str
    head: list[str]
    rows: list[list[str]]
    left: set[int]
    hidden: int = 0


def artifact_caption(name: str) -> str:
    """``test_per_label_f1.png`` -> ``Per label f1 on the test split``: the caption of a test
    figure or table, from its artifact name alone, so that a new problem type needs no wording here."""
    stem = name.removeprefix(TEST_PREFIX).rsplit(".", 1)[0].replace("_", " ").strip() or name
    return f"{stem[:1].upper()}{stem[1:]} on the test split"


def format_cell(value: Any) -> str:
    """A table cell: floats to 3 decimals, ints (and booleans) as they are, None as a dash."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{TABLE_DECIMALS}f}"
    return str(value)


def table_view(name: str, rows: list[dict[str, Any]], limit: int | None = None) -> TableView:
    """The cells of a test table, its first ``limit`` rows (all when None) in the order logged."""
    head = list(dict.fromkeys(column for row in rows for column in row))
    shown = rows if limit is None else rows[:limit]
    # A column is text when any of its values is: a label column stays left even if one is a number.
    left = {i for i, column in enumerate(head) if any(isinstance(row.get(column), str) for row in rows)}
    cells = [[format_cell(row.get(column)) for column in head] for row in shown]
    return TableView(name, artifact_caption(name), head, cells, left, len(rows) - len(shown))
