"""The report in the terminal: the leaderboard, the trials by method (when the study tried
several), the baseline next to the best trial, and the registered model with its test tables,
printed with rich (plain text when stdout is not a terminal)."""

from __future__ import annotations

import sys

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftsearch.formatting import MISSING, format_metric, format_seconds, format_value
from ftsearch.report.collect import StudyReport, TrialRow
from ftsearch.report.views import (
    TableView,
    comparison_gaps,
    comparison_rows,
    cost_cells,
    cost_head,
    counts_text,
    front_text,
    latency_sentence,
    method_rows,
    method_table,
    model_sentence,
    ranking_text,
    shown_params,
    split_params,
    state_label,
    table_view,
)

_FIXED_WIDTH = 60  # about what the trial, state, value, epochs and duration columns take
_COST_WIDTH = 36  # and the cost columns, when trials measured them
TABLE_ROWS = 10  # rows of each test table printed; the HTML report has them all


def print_report(report: StudyReport, top: int = 10, console: Console | None = None) -> None:
    """Print the leaderboard of the ``top`` trials, every trial summed up by method when more than
    one method has trials, the baseline next to the best trial, and the champion (or candidate)
    with its test metrics and the first ``TABLE_ROWS`` rows of each of its test tables. Plain text
    when stdout is not a terminal."""
    if console is None:
        # Piped or captured output is not squeezed to 80 columns; rich drops colours there itself.
        console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(Text(f"study {report.study_name} ({report.storage_url}): {counts_text(report)}", style="bold"))
    shown = report.rows[:top]
    if shown:
        _print_leaderboard(console, report, shown)
    else:
        console.print("No trial has run yet: nothing to rank.")
    if report.objectives:
        console.print(Text(front_text(report)))
    methods = method_rows(report)
    if len(methods) > 1:  # with one method the leaderboard already says it all
        view = method_table(report, methods)
        console.print(_table(view, view.caption))
    _print_comparison(console, report)
    console.print(Text(model_sentence(report)))
    if latency := latency_sentence(report):
        console.print(Text(latency))
    _print_tables(console, report)
    for note in report.notes:
        console.print(Text(f"note: {note}", style="yellow"))


def _print_leaderboard(console: Console, report: StudyReport, shown: list[TrialRow]) -> None:
    """The table of the trials shown, the params they share, and why any of them failed."""
    params = [shown_params(row) for row in shown]
    varying, constant = split_params(params)
    table = Table(
        title=f"Top {len(shown)} of {len(report.rows)} trials by validation {report.metric}, {ranking_text(report)}",
        box=box.SIMPLE_HEAVY, title_justify="left",
    )
    for header, justify in [("trial", "right"), ("state", "left"), (f"val {report.metric}", "right"),
                            ("epochs", "right"), ("duration", "right"), *((h, "right") for h in cost_head(report))]:
        table.add_column(header, justify=justify, no_wrap=True)
    values = [{n: _short(format_value(p[n])) if n in p else MISSING for n in varying} for p in params]
    # One column per param while they fit the width; else one wrapped "params" column, which
    # stays readable where a dozen squeezed columns would fold every value over four lines.
    width = _FIXED_WIDTH + (_COST_WIDTH if cost_head(report) else 0) + sum(3 + max(len(n), *(len(v[n]) for v in values)) for n in varying)
    as_columns = width <= console.width
    for name in varying if as_columns else ["params"]:
        table.add_column(name, justify="right" if as_columns else "left", overflow="fold")
    for row, row_values in zip(shown, values, strict=True):
        cells = [str(row.number), state_label(row), format_metric(row.value), str(row.epochs), format_seconds(row.seconds),
                 *cost_cells(report, row)]
        if as_columns:
            cells += list(row_values.values())
        else:
            cells.append(", ".join(f"{n} {v}" for n, v in row_values.items() if v != MISSING))
        table.add_row(*[Text(c) for c in cells], style="bold green" if report.is_best(row) else None)
    console.print(table)
    if constant:
        console.print(Text("same in every trial shown: " + ", ".join(
            f"{k} {_short(format_value(v))}" for k, v in constant.items())))
    for row in shown:
        if row.state == "FAIL" and row.reason:  # a failure is a bug or a broken setup: say which
            console.print(Text(f"trial {row.number} failed: {row.reason.splitlines()[0]}", style="red"))


def _print_comparison(console: Console, report: StudyReport) -> None:
    """The baseline next to the best trial, or sentences on what is missing for it."""
    comparison = comparison_rows(report)
    if comparison:
        table = Table(title="What fine-tuning buys", box=box.SIMPLE_HEAVY, title_justify="left")
        table.add_column("")
        table.add_column(f"val {report.metric}", justify="right")
        table.add_column(f"test {report.metric}", justify="right")
        for cells in comparison:
            table.add_row(*[Text(c) for c in cells])
        console.print(table)
    for gap in comparison_gaps(report):
        console.print(Text(gap))


def _print_tables(console: Console, report: StudyReport) -> None:
    """The registered model's test tables, ``TABLE_ROWS`` rows each in the order logged, and how
    many rows each leaves out."""
    tables = report.model.tables if report.model is not None else {}
    for name, rows in tables.items():
        view = table_view(name, rows, TABLE_ROWS)
        console.print(_table(view, f"{view.caption} ({name})"))
        if view.hidden:
            console.print(Text(f"{view.hidden} more row{'s' if view.hidden > 1 else ''} of {name} not shown "
                               f"(the HTML report has all {len(rows)})"))


def _table(view: TableView, title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    for i, header in enumerate(view.head):
        table.add_column(header, justify="left" if i in view.left else "right", overflow="fold")
    for cells in view.rows:
        table.add_row(*[Text(c) for c in cells])
    return table


def _short(text: str) -> str:
    # A backbone given as a local path is shown by its folder name; the HTML keeps the full path.
    return text.rstrip("/").rsplit("/", 1)[-1] if "/" in text else text
