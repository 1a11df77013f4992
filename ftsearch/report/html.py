"""The self-contained HTML report, rendered through ``templates/report.html.j2`` (Jinja2, autoescape
on): plotly.js inline once, with the first figure; images as data URIs; nothing in the page points
outside it, so it opens offline and as an MLflow artifact alike.

This module decides what each section shows (the figures, the cells, which sentence stands in for
missing data); the template lays it out.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from markupsafe import Markup

from ftsearch.formatting import MISSING, format_metric, format_seconds, format_value
from ftsearch.objectives import primary
from ftsearch.report.collect import StudyReport
from ftsearch.report.views import (
    TableView,
    artifact_caption,
    comparison_gaps,
    comparison_rows,
    cost_cells,
    cost_head,
    counts_text,
    data_view,
    front_text,
    latency_sentence,
    method_rows,
    method_table,
    methods_gap,
    model_metrics,
    model_sentence,
    ranking_text,
    shown_params,
    split_params,
    state_label,
    table_view,
)

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "report.html.j2"
ROUGH_IMPORTANCES = 10  # below this many completed trials, importances get a caveat


@dataclass(frozen=True)
class Picture:
    """A figure shown as an image (a test figure of the registered model's run, a figure of the
    data): its artifact name, caption and data URI."""

    name: str
    caption: str
    uri: str


@dataclass
class Plot:
    """A figure section: the figure's markup (None when it could not be drawn), then sentences."""

    anchor: str
    title: str
    figure: Markup | None = None
    notes: list[str] = field(default_factory=list)


class _Figures:
    """Plotly figures as page markup; plotly.js goes inline once, with the first (none if no figure)."""

    def __init__(self) -> None:
        self.plotly_included = False

    def markup(self, fig) -> Markup:
        import plotly.io as pio

        text = pio.to_html(
            fig, full_html=False, include_plotlyjs=not self.plotly_included,
            # No "produced with plotly" link, no Chart Studio: nothing in the page points outside.
            config={"displaylogo": False, "responsive": True},
            default_height="460px",
        )
        self.plotly_included = True
        return Markup(text)  # plotly's own markup and script: not escaped


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_html(report: StudyReport) -> str:
    """The self-contained HTML report: plotly.js inline, images as data URIs, no network needed."""
    figures = _Figures()  # page order: plotly.js comes with the learning curves when there are any
    plots = [_learning_curves_plot(report, figures), *_study_plots(report, figures)]
    return _environment().get_template(TEMPLATE).render(
        report=report,
        counts=counts_text(report),
        direction=report.study.directions[0].name.lower(),
        generated=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        comparison=comparison_rows(report),
        gaps=comparison_gaps(report),
        model_sentence=model_sentence(report),
        latency=latency_sentence(report),
        model_metrics={k: format_metric(v) for k, v in model_metrics(report).items()},
        model_figures=_model_figures(report),
        model_tables=_model_tables(report),
        # An older study's parent run has no data_report.json: the section is left out.
        data=data_view(report.data) if report.data else None,
        data_figures=[Picture(name, "Likely label errors in train, titled given -> suggested", _png_uri(png))
                      for name, png in report.data_figures.items()],
        ranking=ranking_text(report),
        leaderboard=_leaderboard(report),
        **_methods(report),
        plots=plots,
    )


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _model_figures(report: StudyReport) -> list[Picture]:
    """The model run's test figures, inline (a data URI each), in artifact name order."""
    figures = report.model.figures if report.model is not None else {}
    return [Picture(name, artifact_caption(name), _png_uri(png)) for name, png in figures.items()]


def _model_tables(report: StudyReport) -> list[TableView]:
    """The model run's test tables, every row: the page has room that the terminal has not."""
    tables = report.model.tables if report.model is not None else {}
    return [table_view(name, rows) for name, rows in tables.items()]


def _leaderboard(report: StudyReport) -> dict:
    """Every trial's cells, with the varying params as columns and a reason column when any
    trial was pruned or failed with one; the params all trials share are listed once."""
    params = [shown_params(row) for row in report.rows]
    varying, constant = split_params(params)
    reasons = any(row.reason for row in report.rows)
    head = ["trial", "state", f"val {report.metric}", "epochs", "duration", *cost_head(report), *varying,
            *(["reason"] if reasons else [])]
    rows = []
    for row, values in zip(report.rows, params, strict=True):
        cells = [str(row.number), state_label(row), format_metric(row.value), str(row.epochs), format_seconds(row.seconds),
                 *cost_cells(report, row)]
        cells += [format_value(values[n]) if n in values else MISSING for n in varying]
        if reasons:
            cells.append(row.reason.splitlines()[0] if row.reason else "")
        rows.append({"css": row.state + (" best" if report.is_best(row) else ""), "cells": cells})
    return {
        "head": head,
        "left": {1, len(head) - 1} if reasons else {1},  # the state and reason columns
        "rows": rows,
        "constant": ", ".join(f"{k} {format_value(v)}" for k, v in constant.items()),
    }


def _methods(report: StudyReport) -> dict:
    """The per-method table, or the sentence that stands in for it (see ``methods_gap``)."""
    summaries = method_rows(report)
    gap = methods_gap(summaries)
    return {"methods": None if gap else method_table(report, summaries), "methods_gap": gap}


def _learning_curves_plot(report: StudyReport, figures: _Figures) -> Plot:
    plot = Plot("learning-curves", f"Learning curves (validation {report.metric} per epoch)")
    if report.curves:
        plot.figure = figures.markup(learning_curves_figure(report))
    else:
        plot.notes.append("No trial has logged a validation epoch to MLflow yet.")
    return plot


def _study_plots(report: StudyReport, figures: _Figures) -> list[Plot]:
    """Optuna's optimisation history, parallel coordinates and param importances, each with the
    sentence that stands in for it when the study cannot show it yet."""
    from optuna import visualization as vis

    complete = [r for r in report.rows if r.state == "COMPLETE"]
    # Params every completed trial shares explain nothing: left out, they would only add flat axes
    # to the parallel coordinates and equal shares (1/n each when nothing matters) to importances.
    varying, _ = split_params([r.params for r in complete])
    plots = []
    for anchor, title, needed, draw in [
        ("optimization-history", "Optimisation history", 1, vis.plot_optimization_history),
        ("parallel-coordinates", "Parallel coordinates", 1, vis.plot_parallel_coordinate),
        ("param-importances", "Parameter importances", 2, vis.plot_param_importances),
    ]:
        plot = Plot(anchor, title)
        plots.append(plot)
        by_params = draw is not vis.plot_optimization_history
        if len(complete) < needed:
            plot.notes.append(f"Needs at least {needed} completed trial{'s' if needed > 1 else ''}; "
                              f"this study has {len(complete)}.")
            continue
        if by_params and not varying:
            plot.notes.append("Every completed trial used the same params: there is nothing to compare.")
            continue
        try:
            with warnings.catch_warnings():
                # Optuna flags some plots experimental and warns on ties: not the reader's concern.
                warnings.simplefilter("ignore")
                fig = draw(report.study, target=primary if report.objectives else None, target_name=f"val {report.metric}",
                           **({"params": varying} if by_params else {}))
            plot.figure = figures.markup(fig)
        except Exception as err:  # noqa: BLE001 - one plot must not cost the whole report
            plot.notes.append(f"Could not draw this plot: {type(err).__name__}: {err}")
        if draw is vis.plot_param_importances and len(complete) < ROUGH_IMPORTANCES:
            plot.notes.append(f"Estimated from only {len(complete)} completed trials: a hint, not a measurement.")
    if report.objectives:
        plots.insert(0, _pareto_plot(report, figures))
    return plots


def _pareto_plot(report: StudyReport, figures: _Figures) -> Plot:
    """Optuna's Pareto front of a study with several objectives (the first two when there are
    more than three): every completed trial, the front highlighted, infeasible trials apart, and
    the trial the study's select rule chose marked."""
    import plotly.graph_objects as go
    from optuna import visualization as vis

    plot = Plot("pareto-front", "Pareto front")
    plot.notes.append(front_text(report))
    if not report.front:
        return plot
    names = report.objectives if len(report.objectives) <= 3 else report.objectives[:2]
    picked = (lambda t: t.values[: len(names)]) if len(names) < len(report.objectives) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature warnings
            fig = vis.plot_pareto_front(report.study, target_names=[_axis(n) for n in names], targets=picked)
        if report.best is not None and len(names) == 2:
            chosen = report.study.trials[report.best.number]
            fig.add_trace(go.Scatter(x=[chosen.values[0]], y=[chosen.values[1]], mode="markers", name="chosen",
                                     marker={"symbol": "star", "size": 18, "color": "gold",
                                             "line": {"width": 1, "color": "black"}},
                                     hovertext=[f"trial {chosen.number} (chosen)"]))
        plot.figure = figures.markup(fig)
    except Exception as err:  # noqa: BLE001 - one plot must not cost the whole report
        plot.notes.append(f"Could not draw this plot: {type(err).__name__}: {err}")
    return plot


def _axis(name: str) -> str:
    """An objective's axis title: a validation metric, or a cost with its unit."""
    return {"latency_ms": "latency, ms per example", "latency_ms_b32": "latency at batch 32, ms per example",
            "params_m": "parameters, millions", "size_mb": "size, MB"}.get(name, f"val {name}")


def learning_curves_figure(report: StudyReport):
    """Validation metric per epoch for every trial: completed trials solid, pruned ones dashed and
    ending in a cross at the epoch where they were stopped, failed ones dotted."""
    import plotly.graph_objects as go

    by_number = {r.number: r for r in report.rows}
    fig = go.Figure()
    for number in sorted(report.curves):
        curve, row = report.curves[number], by_number[number]
        steps, values = [s for s, _ in curve], [v for _, v in curve]
        best = report.is_best(row)
        dash = {"COMPLETE": "solid", "PRUNED": "dash", "FAIL": "dot"}.get(row.state, "dashdot")
        label = f"trial {number}" + ("" if row.state == "COMPLETE" else f" ({state_label(row).lower()})")
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
