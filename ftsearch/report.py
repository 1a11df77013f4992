"""Study reports: a leaderboard in the terminal and a self-contained HTML report of one study.

Everything is read back from where a search left it: the Optuna storage (trials, states, values,
params) and MLflow (learning curves, the baseline on the parent run, test metrics, the registered
champion and its confusion matrix). Nothing here trains or changes a model; the only writes are
the HTML file and its copy on the study's parent run (``report.html``).

A study can be reported on at any time, half-run or still running: every part that has no data
yet says so in a sentence instead of failing.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from ftsearch import settings, tracking
from ftsearch.distributed import storage
from ftsearch.config import STUDIES_DIR, StudyConfig
from ftsearch.errors import FtsearchError
from ftsearch.generations import PARENT_RUN_ATTR, REASON_ATTR, RUN_ID_ATTR, generations

REPORT_ARTIFACT = "report.html"
CONFUSION_MATRIX_ARTIFACT = "test_confusion_matrix.png"
ALIASES = ("champion", "candidate")  # the first that exists is the model shown
TEST_METRICS = ("test_accuracy", "test_f1")
ROUGH_IMPORTANCES = 10  # below this many completed trials, importances get a caveat
# Leaderboard order: finished trials by value first, then those that stopped early, then the rest.
_STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2}


@dataclass(frozen=True)
class TrialRow:
    """One trial as the leaderboard shows it.

    ``value`` is the best epoch's validation metric: the objective for a completed trial, the best
    epoch reached for a pruned one (Optuna itself stores a pruned trial's *last* epoch).
    """

    number: int
    state: str
    value: float | None
    epochs: int
    seconds: float | None
    params: dict[str, Any]
    run_id: str | None
    reason: str = ""


@dataclass(frozen=True)
class Baseline:
    """The classical baseline logged on the study's parent run."""

    name: str
    val: float | None
    test: float | None


@dataclass(frozen=True)
class ModelSummary:
    """The registered version behind an alias, with what its tags say about it."""

    name: str
    version: str
    alias: str
    optuna_study: str
    trial_number: str
    run_id: str
    val: float | None
    test: dict[str, float]
    confusion_png: bytes | None


@dataclass
class StudyReport:
    """Everything a report shows, gathered once; rendering never goes back to the stores."""

    config: StudyConfig
    study: optuna.Study
    storage_url: str
    parent_run_id: str | None
    rows: list[TrialRow]
    curves: dict[int, list[tuple[int, float]]]
    baseline: Baseline | None
    best: TrialRow | None
    best_test: dict[str, float]
    model: ModelSummary | None
    notes: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.config.metric

    @property
    def study_name(self) -> str:
        return self.study.study_name

    def curves_epochs(self) -> list[int]:
        """The last epoch of every learning curve."""
        return [curve[-1][0] for curve in self.curves.values() if curve]

    def counts(self) -> dict[str, int]:
        """Trials per state, in a fixed order, leaving out states no trial is in."""
        states = [r.state for r in self.rows]
        order = ["COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"]
        return {s: states.count(s) for s in order if states.count(s)}


@dataclass(frozen=True)
class ReportResult:
    """What ``make_report`` did, for the CLI to print and tests to check."""

    report: StudyReport
    path: Path
    logged_to: str | None  # the parent run that got report.html, None when it could not


# ---------------------------------------------------------------------------------------------
# Gathering


def find_study(name: str, storage_url: str | None = None, search_hint: str | None = None) -> tuple[optuna.Study, str]:
    """The latest generation (``name``, ``name.2``, ...) of a study, as ``ftsearch search`` resumes it.

    Returns the study and the storage URL. Raises FtsearchError naming the studies that do exist
    when there is none by that name, and the command that would create it (``search_hint``).
    """
    url = settings.optuna_storage_url(storage_url)
    optuna_storage = storage.open_existing(url)
    try:
        names = storage.names_in(optuna_storage) if optuna_storage is not None else []
    except Exception as err:  # noqa: BLE001 - unreachable server, broken file
        raise FtsearchError(f"cannot read Optuna storage {url!r}: {str(err).splitlines()[0]}") from None
    found = generations(names, name)
    if not found:
        known = ", ".join(sorted(names)) or "none"
        raise FtsearchError(
            f"no study {name!r} in the Optuna storage {url} (studies there: {known}); "
            f"run `{search_hint or f'ftsearch search {name}'}` first"
        )
    return optuna.load_study(study_name=found[max(found)], storage=optuna_storage), url


def study_argument(config: StudyConfig) -> str:
    """How the user names the study on the command line: by name for studies/, else by path."""
    source = Path(config.source) if config.source else None
    return config.name if source is None or source.resolve().parent == STUDIES_DIR else str(source)


def _search_command(config: StudyConfig, storage_url: str | None) -> str:
    return f"ftsearch search {study_argument(config)}" + (f" --storage {storage_url}" if storage_url else "")


def collect(config: StudyConfig, storage_url: str | None = None) -> StudyReport:
    """Read a study's trials from Optuna and its runs and models from MLflow."""
    study, url = find_study(config.name, storage_url, _search_command(config, storage_url))
    client = tracking.client()
    notes: list[str] = []
    metric_key = f"val_{config.metric}"
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE

    curves: dict[int, list[tuple[int, float]]] = {}
    rows = []
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            curve = _curve(client, run_id, metric_key)
            if curve is None:
                notes.append(f"the MLflow run {run_id} of trial {trial.number} no longer exists")
            elif curve:
                curves[trial.number] = curve
        row = _row(trial, curves.get(trial.number), maximize)
        if row.state == "FAIL" and not row.reason and run_id:
            # A worker that died could not say why; whoever noticed wrote it on the run.
            run = _get_run(client, run_id)
            row = replace(row, reason=run.data.tags.get(tracking.REASON_TAG, "") if run is not None else "")
        rows.append(row)
    # The best trial is Optuna's (the one the search registered), also when others tie with it.
    best_number = _best_trial_number(study)
    rows.sort(key=lambda r: _rank_key(r, maximize, best_number))

    parent_run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    baseline = None
    parent = _get_run(client, parent_run_id) if parent_run_id else None
    if parent_run_id and parent is None:
        notes.append(f"the study's MLflow parent run {parent_run_id} no longer exists")
        parent_run_id = None
    if parent is not None and "baseline" in parent.data.tags:
        metrics = parent.data.metrics
        baseline = Baseline(
            parent.data.tags["baseline"],
            metrics.get(f"baseline_val_{config.metric}"),
            metrics.get(f"baseline_test_{config.metric}"),
        )

    best = next((r for r in rows if r.number == best_number), None)
    best_test: dict[str, float] = {}
    if best is not None and best.run_id:
        best_run = _get_run(client, best.run_id)
        if best_run is not None:
            best_test = {k: v for k, v in best_run.data.metrics.items() if k in TEST_METRICS}

    model = _registered_model(client, config.registered_model, notes)
    return StudyReport(config, study, url, parent_run_id, rows, curves, baseline, best, best_test, model, notes)


def _get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _curve(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]] | None:
    """The metric per epoch (step), or None when the run is gone."""
    try:
        history = client.get_metric_history(run_id, key)
    except MlflowException:
        return None
    return sorted((m.step, m.value) for m in history)


def _row(trial: FrozenTrial, curve: list[tuple[int, float]] | None, maximize: bool) -> TrialRow:
    if trial.state == TrialState.COMPLETE:
        value = trial.value
    else:
        # Optuna's reported values, one per epoch, survive even when the MLflow run does not.
        reported = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
        value = (max if maximize else min)(reported) if reported else None
    epochs = len(curve) if curve else len(trial.intermediate_values)
    seconds = trial.duration.total_seconds() if trial.duration is not None else None
    if seconds is None and trial.state == TrialState.RUNNING and trial.datetime_start is not None:
        seconds = (dt.datetime.now() - trial.datetime_start).total_seconds()
    return TrialRow(
        number=trial.number,
        state=trial.state.name,
        value=value,
        epochs=epochs,
        seconds=seconds,
        params=dict(trial.params),
        run_id=trial.user_attrs.get(RUN_ID_ATTR),
        reason=trial.user_attrs.get(REASON_ATTR, ""),
    )


def _best_trial_number(study: optuna.Study) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:  # no completed trial yet
        return None


def _rank_key(row: TrialRow, maximize: bool, best_number: int | None) -> tuple:
    state = _STATE_ORDER.get(TrialState[row.state], 3)
    if row.value is None or state > 1:
        return (state, 1, 0.0, True, row.number)
    return (state, 0, -row.value if maximize else row.value, row.number != best_number, row.number)


def _registered_model(client: MlflowClient, name: str, notes: list[str]) -> ModelSummary | None:
    for alias in ALIASES:
        try:
            version = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            continue  # no such model, or no version with this alias yet
        tags = version.tags
        run_id = tags.get("run_id") or version.run_id or ""
        val = next((float(v) for k, v in tags.items() if k.startswith("val_")), None)
        test = {k: float(tags[k]) for k in TEST_METRICS if k in tags}
        return ModelSummary(
            name=name,
            version=str(version.version),
            alias=alias,
            optuna_study=tags.get("optuna_study", ""),
            trial_number=tags.get("trial_number", "?"),
            run_id=run_id,
            val=val,
            test=test,
            confusion_png=_artifact_bytes(client, run_id, CONFUSION_MATRIX_ARTIFACT, notes) if run_id else None,
        )
    return None


def _artifact_bytes(client: MlflowClient, run_id: str, path: str, notes: list[str]) -> bytes | None:
    with tempfile.TemporaryDirectory() as folder:
        try:
            return Path(client.download_artifacts(run_id, path, folder)).read_bytes()
        except Exception as err:  # noqa: BLE001 - a missing picture is a sentence, not a failure
            notes.append(f"could not read {path} of run {run_id}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            return None


# ---------------------------------------------------------------------------------------------
# Formatting shared by the terminal and HTML


def format_seconds(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; an em dash when unknown."""
    if seconds is None:
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_value(value: Any) -> str:
    """A param or metric for display: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _split_params(rows: list[TrialRow]) -> tuple[list[str], dict[str, Any]]:
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


def _state_label(row: TrialRow) -> str:
    if row.state == "PRUNED":
        return f"PRUNED at epoch {row.epochs}" if row.epochs else "PRUNED"
    return row.state


# ---------------------------------------------------------------------------------------------
# Terminal


def print_report(report: StudyReport, top: int = 10, console=None) -> None:
    """Print the leaderboard of the ``top`` trials, the baseline next to the best trial, and the
    champion (or candidate) with its test metrics. Plain text when stdout is not a terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        import sys

        # Piped or captured output is not squeezed to 80 columns; rich drops colours there itself.
        console = Console(width=None if sys.stdout.isatty() else 160)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in report.counts().items()) or "no trials yet"
    console.print(Text(f"study {report.study_name} ({report.storage_url}): {counts}", style="bold"))

    shown = report.rows[:top]
    if not shown:
        console.print("No trial has run yet: nothing to rank.")
    else:
        varying, constant = _split_params(shown)
        table = Table(
            title=f"Top {len(shown)} of {len(report.rows)} trials by validation {report.metric}",
            box=box.SIMPLE_HEAVY, title_justify="left",
        )
        for header, justify in [("trial", "right"), ("state", "left"), (f"val {report.metric}", "right"),
                                ("epochs", "right"), ("duration", "right")]:
            table.add_column(header, justify=justify, no_wrap=True)
        values = [{n: _short(format_value(row.params[n])) if n in row.params else "—" for n in varying} for row in shown]
        # One column per param while they fit the width; else one wrapped "params" column, which
        # stays readable where a dozen squeezed columns would fold every value over four lines.
        width = 60 + sum(3 + max(len(n), *(len(v[n]) for v in values)) for n in varying)
        as_columns = width <= console.width
        for name in varying if as_columns else ["params"]:
            table.add_column(name, justify="right" if as_columns else "left", overflow="fold")
        for row, row_values in zip(shown, values, strict=True):
            style = "bold green" if report.best is not None and row.number == report.best.number else None
            cells = [str(row.number), _state_label(row), _metric(row.value), str(row.epochs), format_seconds(row.seconds)]
            if as_columns:
                cells += list(row_values.values())
            else:
                cells.append(", ".join(f"{n} {v}" for n, v in row_values.items() if v != "—"))
            table.add_row(*[Text(c) for c in cells], style=style)
        console.print(table)
        if constant:
            console.print(Text("same in every trial shown: " + ", ".join(
                f"{k} {_short(format_value(v))}" for k, v in constant.items())))
        for row in shown:
            if row.state == "FAIL" and row.reason:  # a failure is a bug or a broken setup: say which
                console.print(Text(f"trial {row.number} failed: {row.reason.splitlines()[0]}", style="red"))

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
    console.print(Text(model_sentence(report)))
    for note in report.notes:
        console.print(Text(f"note: {note}", style="yellow"))


def _short(text: str) -> str:
    # A backbone given as a local path is shown by its folder name; the HTML keeps the full path.
    return text.rstrip("/").rsplit("/", 1)[-1] if "/" in text else text


def comparison_rows(report: StudyReport) -> list[tuple[str, str, str]]:
    """(label, val metric, test metric) for the baseline, the best trial and their difference,
    as far as each exists."""
    m = report.metric
    rows = []
    baseline, best = report.baseline, report.best
    best_test = report.best_test.get(f"test_{m}")
    if baseline is not None:
        rows.append((f"classical baseline: {baseline.name}", _metric(baseline.val), _metric(baseline.test)))
    if best is not None:
        rows.append((f"best fine-tuned trial ({best.number})", _metric(best.value), _metric(best_test)))
    if baseline is not None and best is not None:
        def diff(a: float | None, b: float | None) -> str:
            return "—" if a is None or b is None else f"{a - b:+.4f}"

        rows.append(("fine-tuned − baseline", diff(best.value, baseline.val), diff(best_test, baseline.test)))
    return rows


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
    tests = ", ".join(f"{k} {v:.4f}" for k, v in model.test.items()) or "no test metrics tagged"
    origin = f"trial {model.trial_number} of study {model.optuna_study or '?'}"
    if model.optuna_study and model.optuna_study != report.study_name:
        origin += " (another generation than this report's)"
    hint = "" if model.alias == "champion" else f"; no champion yet: `ftsearch promote {study_argument(report.config)}`"
    return f"{model.alias}: {model.name} v{model.version} from {origin}: {tests}{hint}"


# ---------------------------------------------------------------------------------------------
# HTML


class _Html:
    """Builds the page; plotly.js goes inline once, with the first figure (none if no figure)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.plotly_included = False

    def add(self, text: str) -> None:
        self.parts.append(text)

    def section(self, anchor: str, title: str) -> None:
        self.add(f'<section id="{anchor}"><h2>{html.escape(title)}</h2>')

    def end(self) -> None:
        self.add("</section>")

    def sentence(self, text: str, css: str = "note") -> None:
        self.add(f'<p class="{css}">{html.escape(text)}</p>')

    def figure(self, fig) -> None:
        import plotly.io as pio

        self.add(pio.to_html(
            fig, full_html=False, include_plotlyjs=not self.plotly_included,
            # No "produced with plotly" link, no Chart Studio: nothing in the page points outside.
            config={"displaylogo": False, "responsive": True},
            default_height="460px",
        ))
        self.plotly_included = True


def render_html(report: StudyReport) -> str:
    """The self-contained HTML report: plotly.js inline, images as data URIs, no network needed."""
    page = _Html()
    m = report.metric
    complete = [r for r in report.rows if r.state == "COMPLETE"]
    counts = ", ".join(f"{n} {s.lower()}" for s, n in report.counts().items()) or "no trials yet"
    generated = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page.add(
        f"<header><h1>Study {html.escape(report.study_name)}</h1>"
        f"<p>{html.escape(counts)}; objective: {html.escape(report.study.direction.name.lower())} "
        f"validation {html.escape(m)}. Optuna storage <code>{html.escape(report.storage_url)}</code>, "
        f"MLflow parent run <code>{html.escape(report.parent_run_id or 'none')}</code>. "
        f"Generated {html.escape(generated)}.</p></header>"
    )

    page.section("summary", "What fine-tuning buys")
    _comparison_table(page, report)
    page.end()

    page.section("champion", "Registered model")
    _model_section(page, report)
    page.end()

    page.section("leaderboard", "Leaderboard")
    _leaderboard_table(page, report)
    page.end()

    page.section("learning-curves", f"Learning curves (validation {m} per epoch)")
    if report.curves:
        page.figure(learning_curves_figure(report))
    else:
        page.sentence("No trial has logged a validation epoch to MLflow yet.")
    page.end()

    from optuna import visualization as vis

    target_name = f"val {m}"
    plots = [
        ("optimization-history", "Optimisation history", 1, vis.plot_optimization_history),
        ("parallel-coordinates", "Parallel coordinates", 1, vis.plot_parallel_coordinate),
        ("param-importances", "Parameter importances", 2, vis.plot_param_importances),
    ]
    # Params every completed trial shares explain nothing: left out, they would only add flat axes
    # to the parallel coordinates and equal shares (1/n each when nothing matters) to importances.
    varying, _ = _split_params(complete)
    for anchor, title, needed, plot in plots:
        page.section(anchor, title)
        if len(complete) < needed:
            page.sentence(f"Needs at least {needed} completed trial{'s' if needed > 1 else ''}; "
                          f"this study has {len(complete)}.")
        elif not varying and plot is not vis.plot_optimization_history:
            page.sentence("Every completed trial used the same params: there is nothing to compare.")
        else:
            params = None if plot is vis.plot_optimization_history else varying
            try:
                with warnings.catch_warnings():
                    # Optuna flags some plots experimental and warns on ties: not the reader's concern.
                    warnings.simplefilter("ignore")
                    figure = plot(report.study, target_name=target_name, **({"params": params} if params else {}))
                page.figure(figure)
            except Exception as err:  # noqa: BLE001 - one plot must not cost the whole report
                page.sentence(f"Could not draw this plot: {type(err).__name__}: {err}")
            if plot is vis.plot_param_importances and len(complete) < ROUGH_IMPORTANCES:
                page.sentence(f"Estimated from only {len(complete)} completed trials: a hint, not a measurement.")
        page.end()

    if report.notes:
        page.section("notes", "Notes")
        page.add("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
        page.end()
    body = "\n".join(page.parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>ftsearch report: {html.escape(report.study_name)}</title>"
        f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: .9rem; } .scroll { overflow-x: auto; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { background: #f5f5f5; } td.left, th.left { text-align: left; }
tr.best td { font-weight: bold; background: #eef8ee; } tr.PRUNED td { color: #8a6d00; } tr.FAIL td { color: #a33; }
p.note { color: #666; font-style: italic; } code { font-size: .85rem; }
img.cm { max-width: 480px; border: 1px solid #ddd; }
"""


def _comparison_table(page: _Html, report: StudyReport) -> None:
    m = html.escape(report.metric)
    rows = comparison_rows(report)
    if rows:
        cells = "".join(
            f'<tr><td class="left">{html.escape(label)}</td><td>{val}</td><td>{test}</td></tr>'
            for label, val, test in rows
        )
        page.add(f'<table><tr><th class="left"></th><th>val {m}</th><th>test {m}</th></tr>{cells}</table>')
    for gap in comparison_gaps(report):
        page.sentence(gap)


def _model_section(page: _Html, report: StudyReport) -> None:
    model = report.model
    page.sentence(model_sentence(report), css="lead" if model else "note")
    if model is None:
        return
    metrics = ({f"val_{report.metric}": model.val} if model.val is not None else {}) | model.test
    if metrics:
        rows = "".join(f'<tr><td class="left">{html.escape(k)}</td><td>{v:.4f}</td></tr>' for k, v in metrics.items())
        page.add(f'<table><tr><th class="left">metric</th><th>value</th></tr>{rows}</table>')
    if model.confusion_png:
        data = base64.b64encode(model.confusion_png).decode("ascii")
        page.add(f'<p>Confusion matrix on the test split:</p><img class="cm" alt="test confusion matrix" '
                 f'src="data:image/png;base64,{data}">')
    else:
        page.sentence(f"The run of {model.alias} v{model.version} has no {CONFUSION_MATRIX_ARTIFACT} to show.")


def _leaderboard_table(page: _Html, report: StudyReport) -> None:
    if not report.rows:
        page.sentence("No trial has run yet.")
        return
    varying, constant = _split_params(report.rows)
    reasons = any(row.reason for row in report.rows)  # why trials were pruned or failed
    head = ["trial", "state", f"val {report.metric}", "epochs", "duration", *varying, *(["reason"] if reasons else [])]
    left_aligned = {1, len(head) - 1} if reasons else {1}
    left = ' class="left"'
    out = ['<div class="scroll"><table><tr>' + "".join(
        f"<th{left if i in left_aligned else ''}>{html.escape(h)}</th>" for i, h in enumerate(head)) + "</tr>"]
    for row in report.rows:
        best = report.best is not None and row.number == report.best.number
        cells = [str(row.number), _state_label(row), _metric(row.value), str(row.epochs), format_seconds(row.seconds)]
        cells += [format_value(row.params[n]) if n in row.params else "—" for n in varying]
        if reasons:
            cells.append(row.reason.splitlines()[0] if row.reason else "")
        tds = "".join(f"<td{left if i in left_aligned else ''}>{html.escape(c)}</td>" for i, c in enumerate(cells))
        css = row.state + (" best" if best else "")
        out.append(f'<tr class="{css}">{tds}</tr>')
    out.append("</table></div>")
    page.add("".join(out))
    if constant:
        page.sentence("Same in every trial: " + ", ".join(f"{k} {format_value(v)}" for k, v in constant.items()) + ".")


def learning_curves_figure(report: StudyReport):
    """Validation metric per epoch for every trial: completed trials solid, pruned ones dashed and
    ending in a cross at the epoch where they were stopped, failed ones dotted."""
    import plotly.graph_objects as go

    by_number = {r.number: r for r in report.rows}
    fig = go.Figure()
    for number in sorted(report.curves):
        curve, row = report.curves[number], by_number[number]
        steps, values = [s for s, _ in curve], [v for _, v in curve]
        best = report.best is not None and number == report.best.number
        dash = {"COMPLETE": "solid", "PRUNED": "dash", "FAIL": "dot"}.get(row.state, "dashdot")
        label = f"trial {number}" + ("" if row.state == "COMPLETE" else f" ({_state_label(row).lower()})")
        if best:
            label += " — best"
        symbols = ["circle"] * len(steps)
        if row.state in ("PRUNED", "FAIL"):
            symbols[-1] = "x"  # where the trial was cut short
        fig.add_trace(go.Scatter(
            x=steps, y=values, mode="lines+markers", name=label,
            line={"dash": dash, "width": 4 if best else 2},
            marker={"symbol": symbols, "size": [8] * (len(steps) - 1) + [14 if row.state != "COMPLETE" else 8]},
            hovertemplate=f"trial {number}, epoch %{{x}}: %{{y:.4f}}<extra>{row.state}</extra>",
        ))
    if report.baseline is not None and report.baseline.val is not None:
        fig.add_hline(y=report.baseline.val, line_dash="dot", line_color="grey",
                      annotation_text=f"baseline val {report.metric}", annotation_position="bottom right")
    fig.update_layout(
        xaxis_title="epoch", yaxis_title=f"val {report.metric}", legend_title="dashed × = pruned",
        # Whole epochs on the axis; one tick per epoch only while that stays readable.
        xaxis={"tickformat": "d", **({"dtick": 1} if max(report.curves_epochs(), default=0) <= 20 else {})},
        margin={"t": 30},
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Writing


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside, then renamed: an interrupted write never leaves half a report.
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, path)
    except OSError as err:
        raise FtsearchError(f"cannot write the report to {path}: {err.strerror or err}") from None
    logged_to = None
    if report.parent_run_id is not None:
        try:
            tracking.client().log_text(report.parent_run_id, page, REPORT_ARTIFACT)
            logged_to = report.parent_run_id
        except Exception as err:  # noqa: BLE001 - the file on disk is the report; the copy is a bonus
            report.notes.append(f"could not log {REPORT_ARTIFACT} to run {report.parent_run_id}: {err}")
    return ReportResult(report, path.resolve(), logged_to)
