"""Gathering a report: what the Optuna storage and MLflow hold about one study, read once.

Trials, states, values and params come from Optuna; learning curves, the baseline and the data
checks' findings (``data_report.json``) on the parent run, test metrics, the registered champion
and its test figures and tables from MLflow. The test metrics, figures (``test_*.png``) and
tables (``test_*.json``) are whatever the runs and model versions carry under a ``test_`` name:
the problem type decides which exist, so nothing here names them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from ftsearch import settings, tracking
from ftsearch.config import STUDIES_DIR, StudyConfig
from ftsearch.data.checks import LABEL_ISSUE_FIGURE, LABEL_ISSUES
from ftsearch.distributed import storage
from ftsearch.errors import FtsearchError
from ftsearch.formatting import first_line
from ftsearch.generations import (
    COST_ATTR,
    EPOCH_SECONDS_ATTR,
    METHOD_ATTR,
    PARENT_RUN_ATTR,
    PEAK_MEMORY_ATTR,
    REASON_ATTR,
    RUN_ID_ATTR,
    TRAINABLE_ATTR,
    best_trial,
    count_states,
    front,
    is_multi_objective,
    latest_generation,
)
from ftsearch.objectives import primary

ALIASES = ("champion", "candidate")  # the first that exists is the model shown
# What `ftsearch export` logs on the registered version's run (ftsearch.export.Exported.metrics).
LATENCY_METRICS = ("torch_latency_ms", "torch_latency_ms_b32", "onnx_latency_ms", "onnx_latency_ms_b32",
                   "onnx_max_abs_diff")
CANDIDATES = "candidates.json"  # on the parent run: the models judged on validation (ftsearch.study)
TEST_PREFIX = "test_"  # run metrics, version tags and root artifacts under this prefix are about the test split
FIGURE_SUFFIX = ".png"  # test_<name>.png: a figure, shown as is
TABLE_SUFFIX = ".json"  # test_<name>.json: a table when it holds a list of row objects (MLflow log_dict)
DATA_REPORT = "data_report.json"  # the data checks' findings, at the root of the parent run (ftsearch.data.checks)
# Trials of studies run before the method was recorded all froze a prefix: the only method then.
LEGACY_METHOD = "freeze"
# Leaderboard order: finished trials by value first, then those that stopped early, then the rest.
_RANK_OF_STATE = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2}


@dataclass(frozen=True)
class TrialRow:
    """One trial as the leaderboard shows it.

    ``value`` is the best epoch's validation metric: the objective for a completed trial, the best
    epoch reached for a pruned one (Optuna itself stores a pruned trial's *last* epoch). ``method``
    is how the backbone was adapted (an Optuna param only when the study searched several);
    ``trainable_params``, ``epoch_seconds`` (mean seconds per epoch, training and validation) and
    ``peak_memory_mb`` (MiB) are None for a trial that did not record them (older studies, a trial
    that failed before training). ``cost`` is the saved model's ``ftsearch.cost.Cost`` (None when
    none was saved), ``over`` the study's constraints it broke (an infeasible trial).
    """

    number: int
    state: str
    value: float | None
    epochs: int
    seconds: float | None
    params: dict[str, Any]
    run_id: str | None
    method: str
    reason: str = ""
    trainable_params: int | None = None
    epoch_seconds: float | None = None
    peak_memory_mb: float | None = None
    cost: dict[str, float] | None = None
    over: tuple[str, ...] = ()


@dataclass(frozen=True)
class Baseline:
    """The classical baseline logged on the study's parent run."""

    name: str
    val: float | None
    test: float | None


@dataclass(frozen=True)
class CandidateRow:
    """One model the search judged on validation before registering (``candidates.json`` on the
    parent run): the best trial, the ensemble of the top trials or the blend with the baseline;
    ``test`` only for the chosen one (the test split is used once)."""

    description: str
    kind: str
    val: float | None
    test: float | None
    models: int
    ms_per_example: float | None
    chosen: bool


@dataclass(frozen=True)
class ReevaluationRow:
    """A top trial's configuration trained with several seeds (``reevaluation`` in
    ``candidates.json``): its mean and standard deviation on validation."""

    trial: int
    mean: float | None
    std: float | None
    seeds: int
    failed: int


@dataclass(frozen=True)
class ModelSummary:
    """The registered version behind an alias, with what its tags say about it and what its run
    logged on the test split.

    ``figures``: every ``test_*.png`` at the root of the run's artifacts, as PNG bytes; ``tables``:
    every ``test_*.json`` there that is a list of row objects (column -> value), rows as logged.
    Both are keyed by artifact name, in name order.
    """

    name: str
    version: str
    alias: str
    optuna_study: str
    trial_number: str
    run_id: str
    val: float | None
    test: dict[str, float]
    figures: dict[str, bytes] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Milliseconds per example where it is served: ``latency_ms`` / ``latency_ms_b32`` as its
    # trial measured them (version tags), and ``ftsearch export``'s PyTorch and ONNX Runtime
    # figures (``torch_latency_ms``, ``onnx_latency_ms``, ... and ``onnx_max_abs_diff``, run metrics).
    latency: dict[str, float] = field(default_factory=dict)


@dataclass
class StudyReport:
    """Everything a report shows, gathered once; rendering never goes back to the stores.

    ``counts`` is trials per state (COMPLETE, PRUNED, FAIL, RUNNING, WAITING), leaving out states
    no trial is in; ``best_test`` the best trial's test metrics (empty until the search scored it);
    ``data`` the parent run's ``data_report.json`` as logged, with ``label_issues.json`` under
    ``label_issues`` (None for a study run before the search logged one, or when it cannot be
    read); ``data_figures`` the parent run's figures of the data (``label_issues.png``), as PNG bytes.
    """

    config: StudyConfig
    study: optuna.Study
    storage_url: str
    parent_run_id: str | None
    rows: list[TrialRow]
    counts: dict[str, int]
    curves: dict[int, list[tuple[int, float]]]
    baseline: Baseline | None
    best: TrialRow | None
    best_test: dict[str, float]
    model: ModelSummary | None
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] | None = None
    data_figures: dict[str, bytes] = field(default_factory=dict)
    baseline_skipped: str = ""  # why the search could fit no baseline (tag ``baseline_skipped``)
    stopped: str = ""  # why the study's stop rule ended it early (tag ``ftsearch.stopped``)
    candidates: list[CandidateRow] = field(default_factory=list)  # none when only the best trial was judged
    reevaluation: list[ReevaluationRow] = field(default_factory=list)  # best mean first; none without seeds
    objectives: list[str] = field(default_factory=list)  # a study with several: their names, the metric first
    front: list[int] = field(default_factory=list)  # and the trials on its Pareto front

    @property
    def metric(self) -> str:
        return self.config.metric

    @property
    def study_name(self) -> str:
        return self.study.study_name

    @property
    def maximize(self) -> bool:
        return self.study.directions[0] == optuna.study.StudyDirection.MAXIMIZE

    def is_best(self, row: TrialRow) -> bool:
        return self.best is not None and row.number == self.best.number

    def curves_epochs(self) -> list[int]:
        """The last epoch of every learning curve."""
        return [curve[-1][0] for curve in self.curves.values() if curve]


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
    latest = latest_generation(names, name)
    if latest is None:
        known = ", ".join(sorted(names)) or "none"
        raise FtsearchError(
            f"no study {name!r} in the Optuna storage {url} (studies there: {known}); "
            f"run `{search_hint or f'ftsearch search {name}'}` first"
        )
    return optuna.load_study(study_name=latest, storage=optuna_storage), url


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
    trials = study.get_trials(deepcopy=False)
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    rows, curves = _rows(client, trials, f"val_{config.metric}", maximize, notes)
    # The best trial is the one the search chose (Optuna's, or the select rule's from the Pareto
    # front), also when others tie with it.
    best_frozen = best_trial(study)
    best_number = best_frozen.number if best_frozen is not None else None
    rows.sort(key=lambda r: _rank_key(r, maximize, best_number))
    best = next((r for r in rows if r.number == best_number), None)

    parent_run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    parent = _get_run(client, parent_run_id) if parent_run_id else None
    if parent_run_id and parent is None:
        notes.append(f"the study's MLflow parent run {parent_run_id} no longer exists")
        parent_run_id = None
    best_run = _get_run(client, best.run_id) if best is not None and best.run_id else None
    return StudyReport(
        config=config,
        study=study,
        storage_url=url,
        parent_run_id=parent_run_id,
        rows=rows,
        counts={state: n for state, n in count_states(trials).items() if n},
        curves=curves,
        baseline=_baseline(parent, config.metric),
        baseline_skipped=parent.data.tags.get(tracking.BASELINE_SKIPPED_TAG, "") if parent is not None else "",
        stopped=parent.data.tags.get(tracking.STOPPED_TAG, "") if parent is not None else "",
        best=best,
        best_test=metrics_on_test(best_run.data.metrics) if best_run is not None else {},
        model=_registered_model(client, config.registered_model, config.metric, notes),
        objectives=list(study.metric_names or [config.metric]) if is_multi_objective(study) else [],
        front=sorted(t.number for t in front(study)),
        notes=notes,
        **(_data_report(client, parent_run_id, notes) if parent_run_id else {}),
        **(_candidates(client, parent_run_id, config.metric, notes) if parent_run_id else {}),
    )


def _candidates(client: MlflowClient, run_id: str, metric: str, notes: list[str]) -> dict[str, list]:
    """The parent run's ``candidates.json`` as ``candidates`` and ``reevaluation`` rows; none (with
    a note if it cannot be read)."""
    names = _artifact_names(client, run_id, notes)
    if names is None or CANDIDATES not in names:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        data = _artifact_bytes(client, run_id, CANDIDATES, folder, notes)
    logged = _json(data) if data is not None else None
    try:
        chosen = int(logged["chosen"])
        candidates = [CandidateRow(str(c["description"]), str(c["kind"]), _number(c.get(f"val_{metric}")),
                                   _number(logged.get("test", {}).get(f"test_{metric}")) if i == chosen else None,
                                   int(c.get("models", 1)), _number(c.get("ms_per_example")), i == chosen)
                      for i, c in enumerate(logged["candidates"])]
        reevaluation = [ReevaluationRow(int(c["trial"]), _number(c.get(f"mean_val_{metric}")),
                                        _number(c.get(f"std_val_{metric}")), int(c["seeds"]), int(c.get("failed", 0)))
                        for c in logged.get("reevaluation", [])]
    except (TypeError, KeyError, ValueError, AttributeError):
        notes.append(f"{CANDIDATES} of run {run_id} is not as the search writes it: the candidates are left out")
        return {}
    return {"candidates": candidates, "reevaluation": reevaluation}


def metrics_on_test(values: Mapping[str, Any]) -> dict[str, float]:
    """The ``test_*`` entries of run metrics or model version tags, as numbers, in key order
    (an entry that is not a number is no metric and is left out)."""
    metrics = {}
    for key in sorted(values):
        if key.startswith(TEST_PREFIX):
            try:
                metrics[key] = float(values[key])
            except (TypeError, ValueError):
                continue
    return metrics



def _rows(
    client: MlflowClient, trials: list[FrozenTrial], metric_key: str, maximize: bool, notes: list[str]
) -> tuple[list[TrialRow], dict[int, list[tuple[int, float]]]]:
    """A row per trial (unsorted) and the learning curve of every trial that logged an epoch."""
    curves: dict[int, list[tuple[int, float]]] = {}
    rows = []
    for trial in trials:
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
    return rows, curves


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
        value = primary(trial)
    else:
        # Optuna's reported values, one per epoch, survive even when the MLflow run does not.
        reported = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
        value = (max if maximize else min)(reported) if reported else None
    epochs = len(curve) if curve else len(trial.intermediate_values)
    seconds = trial.duration.total_seconds() if trial.duration is not None else None
    if seconds is None and trial.state == TrialState.RUNNING and trial.datetime_start is not None:
        seconds = (dt.datetime.now() - trial.datetime_start).total_seconds()
    attrs = trial.user_attrs
    return TrialRow(
        number=trial.number,
        state=trial.state.name,
        value=value,
        epochs=epochs,
        seconds=seconds,
        params=dict(trial.params),
        run_id=attrs.get(RUN_ID_ATTR),
        # The sampled method stands in for a trial that failed before recording it.
        method=attrs.get(METHOD_ATTR) or trial.params.get("method", LEGACY_METHOD),
        reason=attrs.get(REASON_ATTR, ""),
        trainable_params=attrs.get(TRAINABLE_ATTR),
        epoch_seconds=attrs.get(EPOCH_SECONDS_ATTR),
        peak_memory_mb=attrs.get(PEAK_MEMORY_ATTR),
        cost=attrs.get(COST_ATTR),
        over=tuple(name for name, value in trial.constraints.items() if value > 0),
    )


def _rank_key(row: TrialRow, maximize: bool, best_number: int | None) -> tuple:
    # An infeasible trial is ranked after those within the constraints, whatever its value.
    state = _RANK_OF_STATE.get(row.state, 3) + (0.5 if row.over else 0)
    if row.value is None or state > 1:
        return (state, 1, 0.0, True, row.number)
    return (state, 0, -row.value if maximize else row.value, row.number != best_number, row.number)


def _baseline(parent, metric: str) -> Baseline | None:
    """The classical baseline on the parent run, None when the run has none (or is gone)."""
    if parent is None or "baseline" not in parent.data.tags:
        return None
    metrics = parent.data.metrics
    return Baseline(
        parent.data.tags["baseline"], metrics.get(f"baseline_val_{metric}"), metrics.get(f"baseline_test_{metric}")
    )


def _data_report(client: MlflowClient, run_id: str, notes: list[str]) -> dict[str, Any]:
    """``data`` and ``data_figures`` of the report (see ``StudyReport``): none without a note when
    the parent run has no ``data_report.json`` (a study run before the search logged it), none with
    a note when it cannot be read or is no object; a ``label_issues.json`` that is no object is
    left out with a note."""
    names = _artifact_names(client, run_id, notes)
    if names is None or DATA_REPORT not in names:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        found = {name: _artifact_bytes(client, run_id, name, folder, notes)
                 for name in (DATA_REPORT, LABEL_ISSUES, LABEL_ISSUE_FIGURE) if name in names}
    data = _json(found[DATA_REPORT]) if found[DATA_REPORT] is not None else None
    if not isinstance(data, dict):
        if found[DATA_REPORT] is not None:
            notes.append(f"{DATA_REPORT} of run {run_id} is not a JSON object: the data section is left out")
        return {}
    if found.get(LABEL_ISSUES) is not None:
        issues = _json(found[LABEL_ISSUES])
        if isinstance(issues, dict):
            data["label_issues"] = issues
        else:
            notes.append(f"{LABEL_ISSUES} of run {run_id} is not a JSON object: the likely label errors are left out")
    figure = found.get(LABEL_ISSUE_FIGURE)
    return {"data": data, "data_figures": {LABEL_ISSUE_FIGURE: figure} if figure is not None else {}}


def _registered_model(client: MlflowClient, name: str, metric: str, notes: list[str]) -> ModelSummary | None:
    for alias in ALIASES:
        try:
            version = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            continue  # no such model, or no version with this alias yet
        tags = version.tags
        run_id = tags.get("run_id") or version.run_id or ""
        figures, tables = _test_artifacts(client, run_id, notes) if run_id else ({}, {})
        val = tags.get(f"val_{metric}")
        run = _get_run(client, run_id) if run_id else None
        measured = {k: v for k, v in (run.data.metrics.items() if run is not None else ()) if k in LATENCY_METRICS}
        latency = {k: float(tags[k]) for k in ("latency_ms", "latency_ms_b32") if _number(tags.get(k)) is not None}
        return ModelSummary(
            name=name,
            version=str(version.version),
            alias=alias,
            optuna_study=tags.get("optuna_study", ""),
            trial_number=tags.get("trial_number", "?"),
            run_id=run_id,
            # The study's own metric: a version tagged by a study on another metric shows none.
            val=_number(val),
            test=metrics_on_test(tags),
            figures=figures,
            tables=tables,
            latency=latency | measured,
        )
    return None


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _test_artifacts(
    client: MlflowClient, run_id: str, notes: list[str]
) -> tuple[dict[str, bytes], dict[str, list[dict[str, Any]]]]:
    """The run's test figures and tables (see ``ModelSummary``), in name order; an artifact that
    cannot be read, or a JSON file that is no table, is left out with a note."""
    listed = _artifact_names(client, run_id, notes)
    if listed is None:
        return {}, {}
    names = sorted(name for name in listed if name.startswith(TEST_PREFIX))
    figures: dict[str, bytes] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            if not name.endswith((FIGURE_SUFFIX, TABLE_SUFFIX)):
                continue
            data = _artifact_bytes(client, run_id, name, folder, notes)
            if data is None:
                continue
            if name.endswith(FIGURE_SUFFIX):
                figures[name] = data
            elif (table := _table(data)) is not None:
                tables[name] = table
            else:
                notes.append(f"{name} of run {run_id} is not a table (a non-empty JSON list of row objects): not shown")
    return figures, tables


def _artifact_names(client: MlflowClient, run_id: str, notes: list[str]) -> list[str] | None:
    """The files at the root of the run's artifacts (the search logs what the report reads
    there), None with a note when they cannot be listed."""
    try:
        listed = client.list_artifacts(run_id)
    except Exception as err:  # noqa: BLE001 - a run that is gone or unreadable costs what it holds only
        notes.append(f"could not list the artifacts of run {run_id}: {first_line(err)}")
        return None
    return [a.path for a in listed if not a.is_dir]


def _json(data: bytes) -> Any:
    """The file's JSON value, None when it holds no JSON."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None


def _table(data: bytes) -> list[dict[str, Any]] | None:
    """The rows of a JSON table, None when the file holds anything else."""
    rows = _json(data)
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        return None
    return rows


def _artifact_bytes(client: MlflowClient, run_id: str, path: str, folder: str, notes: list[str]) -> bytes | None:
    try:
        return Path(client.download_artifacts(run_id, path, folder)).read_bytes()
    except Exception as err:  # noqa: BLE001 - a missing picture is a sentence, not a failure
        notes.append(f"could not read {path} of run {run_id}: {first_line(err)}")
        return None
