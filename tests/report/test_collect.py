"""Gathering a report: the study's latest generation, its trials in leaderboard order, the counts,
and every ``test_*`` metric the runs and the registered model carry (none is named in advance)."""

from __future__ import annotations

import math

import optuna
import pytest

from ftsearch import report
from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.distributed.storage import open_storage
from ftsearch.report.collect import metrics_on_test
from tests.helpers import optuna_study, store
from tests.report.samples import per_label_rows, png


def expected_value(trial: optuna.trial.FrozenTrial) -> float:
    """The leaderboard's value: the objective, or for a pruned trial its best epoch."""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return trial.value
    return max(v for v in trial.intermediate_values.values() if not math.isnan(v))


def test_the_search_produced_what_the_report_is_about(in_reported):
    states = [t.state.name for t in optuna_study("tiny").trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]


def test_rows_are_the_studys_trials_in_leaderboard_order(in_reported):
    trials = optuna_study("tiny").trials
    ranked = sorted(trials, key=lambda t: (t.state.name != "COMPLETE", -expected_value(t), t.number))
    rows = report.collect(load_study(str(in_reported[1]))).rows
    for row, trial in zip(rows, ranked, strict=True):
        assert (row.number, row.state, row.params) == (trial.number, trial.state.name, trial.params)
        assert row.value == pytest.approx(expected_value(trial))
        assert row.epochs == len(trial.intermediate_values)
        assert row.seconds == pytest.approx(trial.duration.total_seconds())


def test_counts_and_best_trial_are_the_studys(in_reported):
    gathered = report.collect(load_study(str(in_reported[1])))
    assert gathered.counts == {"COMPLETE": 2, "PRUNED": 1}  # states no trial is in are left out
    assert gathered.best is not None and gathered.best.number == optuna_study("tiny").best_trial.number


def test_every_test_metric_on_the_best_run_and_the_champion_is_collected(in_reported):
    """The classification search logs test_accuracy and test_f1: both are collected, as every
    other ``test_*`` metric would be, from the run's metrics and the version's tags."""
    gathered = report.collect(load_study(str(in_reported[1])))
    best_run = store().get_run(gathered.best.run_id)
    champion = store().get_model_version_by_alias("tiny-sentiment", "champion")
    logged = {k: v for k, v in best_run.data.metrics.items() if k.startswith("test_")}
    tagged = {k: float(v) for k, v in champion.tags.items() if k.startswith("test_")}
    assert {"test_accuracy", "test_f1"} <= logged.keys() and {"test_accuracy", "test_f1"} <= tagged.keys()
    assert gathered.best_test == logged
    assert gathered.model is not None and gathered.model.test == tagged


def test_metrics_on_test_takes_every_test_key_as_a_number_and_nothing_else():
    tags = {"test_rmse": "0.25", "val_rmse": "0.2", "baseline_test_rmse": 0.3, "test_pearson": 0.9,
            "test_split": "held out", "run_id": "abc", "test_accuracy": 1}
    assert metrics_on_test(tags) == {"test_accuracy": 1.0, "test_pearson": 0.9, "test_rmse": 0.25}
    assert list(metrics_on_test(tags)) == ["test_accuracy", "test_pearson", "test_rmse"]  # in key order


def test_unknown_study_names_the_studies_that_exist(in_reported, write_study, capsys):
    path = write_study("other")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no study 'other' in the Optuna storage")
    assert "studies there: tiny" in err and f"run `ftsearch search {path}` first" in err
    assert "Traceback" not in err


def test_report_before_any_search_creates_nothing(write_study, state_dir, capsys):
    assert main(["report", str(write_study())]) == 2
    assert "studies there: none" in capsys.readouterr().err
    assert not (state_dir / "optuna.journal").exists()


def test_a_minimize_study_ranks_its_trials_lowest_first(minimize_study):
    """rmse is lower-is-better: the lowest completed trial leads and is the best; a pruned trial
    is ranked by its lowest epoch, after every completed one."""
    gathered = report.collect(minimize_study)
    assert not gathered.maximize
    assert [(r.number, r.state, r.value) for r in gathered.rows] == [
        (1, "COMPLETE", 0.2), (0, "COMPLETE", 0.5), (2, "COMPLETE", 0.9), (3, "PRUNED", 0.1)]
    assert gathered.best is not None and gathered.best.number == 1


def test_the_model_runs_test_figures_and_tables_are_collected(write_study, registered_run):
    """Every test_*.png (as bytes) and test_*.json table at the root of the run, in name order;
    a JSON file that is no table is left out with a note, other artifacts silently."""
    config = load_study(str(write_study()))
    optuna.create_study(study_name=config.name, storage=open_storage(), direction="maximize")  # no trials
    figures = {"test_scatter.png": png((0, 0, 255)), "test_per_label_f1.png": png((255, 0, 0))}
    run_id = registered_run({**figures, "test_per_label.json": per_label_rows(3), "test_summary.json": {"n": 3},
                             "confusion_matrix.png": png((0, 255, 0)), "trial_config.json": {"lr": 0.1}},
                            tags={"val_accuracy": "0.75", "val_f1": "0.5"})
    gathered = report.collect(config)
    model = gathered.model
    assert model is not None and model.alias == "candidate" and model.run_id == run_id
    assert model.val == 0.75  # the study's metric, not whichever val_ tag comes first
    assert list(model.figures) == ["test_per_label_f1.png", "test_scatter.png"]
    assert model.figures == figures
    assert model.tables == {"test_per_label.json": per_label_rows(3)}
    assert any("test_summary.json" in note and "not a table" in note for note in gathered.notes)
