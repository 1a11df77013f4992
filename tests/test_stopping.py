"""The stop rule: a study ends once its best value stops improving (study file key ``stop``)."""

from __future__ import annotations

import datetime as dt

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.distributed import storage, worker
from ftsearch.report.collect import collect
from ftsearch.stopping import converged
from tests.helpers import optuna_study, runs

START = dt.datetime(2026, 1, 1)


def finished(values: list[float | None]) -> list:
    """Trials finished one second apart in list order; None is a pruned trial."""
    trials = []
    for number, value in enumerate(values):
        trial = create_trial(state=TrialState.PRUNED if value is None else TrialState.COMPLETE, value=value)
        trial.number = number
        trial.datetime_complete = START + dt.timedelta(seconds=number)
        trials.append(trial)
    return trials


def first_stop(values: list[float | None], direction: str, patience: int, min_delta: float) -> int | None:
    """How many finished trials the rule lets run before it says stop (None: never)."""
    trials = finished(values)
    return next((n for n in range(len(trials) + 1) if converged(trials[:n], direction, patience, min_delta)), None)


def test_stops_once_the_last_patience_trials_do_not_beat_the_best_before_them_by_min_delta():
    # 0.71 beats 0.70 by 0.01, not by more than 0.02: after 0.71, 0.705, 0.70 the study has converged.
    assert first_stop([0.5, 0.7, 0.71, 0.705, 0.70, 0.9], "maximize", patience=3, min_delta=0.02) == 5
    # With no min_delta the 0.71 counts as progress, so three more trials without one are needed.
    assert first_stop([0.5, 0.7, 0.71, 0.705, 0.70, 0.70, 0.6], "maximize", patience=3, min_delta=0.0) == 6


def test_a_big_improvement_inside_the_window_keeps_the_study_going():
    assert first_stop([0.5, 0.5, 0.5, 0.8, 0.5, 0.5], "maximize", patience=3, min_delta=0.01) is None


def test_a_lower_is_better_metric_improves_downwards():
    assert first_stop([1.0, 0.9, 0.95, 0.91], "minimize", patience=2, min_delta=0.0) == 4
    assert first_stop([1.0, 0.9, 0.95, 0.5, 0.6], "minimize", patience=2, min_delta=0.0) is None


def test_pruned_trials_count_as_trials_that_did_not_improve():
    assert first_stop([0.8, None, None], "maximize", patience=2, min_delta=0.0) == 3
    # Nothing to improve on while every earlier trial was pruned.
    assert first_stop([None, None, 0.5], "maximize", patience=2, min_delta=0.0) is None


def test_trials_are_read_in_the_order_they_finished_not_by_number():
    trials = finished([0.9, 0.5, 0.5])
    trials[0].datetime_complete = START + dt.timedelta(seconds=10)  # trial 0 finished last, and improved
    assert converged(trials, "maximize", patience=2, min_delta=0.0) is None


def test_the_worker_loop_stops_at_the_trial_the_rule_names_and_leaves_the_rest_waiting(tmp_path):
    store = storage.open_storage(str(tmp_path / "optuna.journal"))
    study = optuna.create_study(study_name="s", storage=store, direction="maximize")
    worker.ensure_slots(study, 10)
    values = iter([0.5, 0.7, 0.71, 0.705, 0.70, 0.99, 0.99, 0.99, 0.99, 0.99])

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        return next(values)

    done = worker.work(
        "s", store, lambda: optuna.load_study(study_name="s", storage=store), objective, lambda s, t: None,
        idle_poll=0.05, should_stop=lambda s: converged(s.get_trials(deepcopy=False), "maximize", 3, 0.02),
    )
    assert done.ran == 5 and done.converged.startswith("converged: none of the last 3 finished trials")
    states = [t.state for t in optuna.load_study(study_name="s", storage=store).trials]
    assert states.count(TrialState.COMPLETE) == 5 and states.count(TrialState.WAITING) == 5


def test_a_converged_search_says_why_on_its_parent_run_and_in_the_report(write_study, capsys):
    # No accuracy can beat another by more than 1: the rule stops the study after patience + 1 trials.
    path = write_study(n_trials=6, stop={"patience": 1, "min_delta": 1.0})
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "study stopped early: converged: none of the last 1 finished trials" in out
    trials = optuna_study("tiny").trials
    assert sum(t.state.is_finished() for t in trials) == 2
    (parent,), children = runs("tiny")
    assert len(children) == 2
    assert parent.data.tags["ftsearch.stopped"].startswith("converged:")
    assert parent.info.status == "FINISHED"
    report = collect(load_study(str(path), cpu=True))
    assert report.stopped == parent.data.tags["ftsearch.stopped"]
    # Resumed, the converged study runs nothing more and registers nothing twice.
    assert main(["search", str(path)]) == 0
    assert sum(t.state.is_finished() for t in optuna_study("tiny").trials) == 2


@pytest.mark.parametrize("stop, message", [
    ({"patience": 0}, "stop.patience"),
    ({"patience": 2, "min_delta": -0.1}, "stop.min_delta"),
    ({"patience": 2, "window": 3}, "stop.window"),
])
def test_a_bad_stop_rule_names_the_key(write_study, stop, message, capsys):
    assert main(["search", str(write_study(stop=stop))]) == 2
    assert message in capsys.readouterr().err
