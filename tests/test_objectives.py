"""Several objectives (ftsearch.objectives): the study file's keys, the choice from the Pareto front,
and a real two-objective search that keeps the front, prunes nothing and registers the chosen trial."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.study import StudyDirection
from optuna.trial import create_trial

from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.objectives import choose
from tests.helpers import build_tiny_bert, optuna_study, runs, store, tiny_study

MAX, MIN = StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE


def front(*values):
    """Completed trials 0, 1, ... with these objective values."""
    trials = [create_trial(values=list(v)) for v in values]
    for number, trial in enumerate(trials):
        trial.number = number
    return trials


def test_each_select_rule_picks_its_trial_from_the_front():
    # accuracy (higher is better) and latency in ms (lower is better): a front from slow and
    # accurate to fast and rough.
    trials = front((0.90, 40.0), (0.89, 12.0), (0.86, 5.0), (0.70, 1.0))
    assert choose(trials, [MAX, MIN], "best").number == 0
    # The fastest within a point of the best accuracy; within ten points, the faster one again.
    assert choose(trials, [MAX, MIN], "within", 0.01).number == 1
    assert choose(trials, [MAX, MIN], "within", 0.05).number == 2
    assert choose(trials, [MAX, MIN], "within", 0.0).number == 0
    # Scaled to [0, 1] over the front (0.70-0.90, 1-40 ms), (0.86, 5 ms) is 0.20 and 0.10 from the
    # ideal (0.90, 1 ms), nearer than (0.89, 12 ms) at 0.05 and 0.28.
    assert choose(trials, [MAX, MIN], "knee").number == 2
    assert choose([], [MAX, MIN], "best") is None


def test_ties_go_to_the_better_next_objective_then_to_the_earlier_trial():
    assert choose(front((0.9, 20.0), (0.9, 10.0)), [MAX, MIN], "best").number == 1
    assert choose(front((0.9, 10.0), (0.9, 10.0)), [MAX, MIN], "best").number == 0
    # A minimised metric (the regression's rmse) with a maximised second objective.
    assert choose(front((0.5, 1.0), (0.4, 0.0)), [MIN, MAX], "best").number == 1


def test_objectives_are_checked_as_the_study_file_is_read(write_study):
    path = write_study(objectives=["latency_ms", "f1"], select={"rule": "within", "tolerance": 0.02}, pruner={"name": "median"})
    path.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "metric"}))
    config = load_study(str(path))
    # The metric left out is the first metric among the objectives, and goes first.
    assert config.metric == "f1" and config.objective_names == ["f1", "latency_ms"]
    assert config.objective_directions == ["maximize", "minimize"]
    assert "pruning: off, the median pruner unused" in config.pruning_note()
    for changes, message in [
        ({"objectives": ["accuracy", "latency"]}, "'latency' is not a metric of text-classification nor a measured cost"),
        ({"objectives": ["f1", "size_mb"], "metric": "accuracy"}, "objectives must include the study's metric 'accuracy'"),
        ({"objectives": ["f1", "f1"]}, "each at most once"),
        ({"objectives": ["f1"]}, "objectives: List should have at least 2 items"),
        ({"select": {"rule": "knee"}}, "select applies to a study with several objectives"),
        ({"select": {"rule": "within", "tolerance": 0.05}}, "select applies to a study with several objectives"),
        ({"objectives": ["f1", "size_mb"], "select": {"rule": "best", "tolerance": 0.1}},
         "select.tolerance applies to rule 'within' only"),
        ({"objectives": ["f1", "size_mb"], "select": {"rule": "nearest"}}, "select.rule: Input should be 'best', 'within' or 'knee'"),
    ]:
        path = write_study(**changes)
        with pytest.raises(Exception) as err:
            load_study(str(path))
        assert str(path) in str(err.value) and message in str(err.value), (changes, str(err.value))


@pytest.fixture
def two_objective_study(tmp_path, tiny_bert, tiny_reviews):
    """A study of accuracy and model size over a 2-block and a 4-block BERT, both trained well
    (enqueued), with the median pruner asked for and an epoch it would prune."""
    big = build_tiny_bert(tmp_path / "big", blocks=4, hidden=64)

    def write(**changes):
        study = tiny_study(tiny_bert, tiny_reviews, **{
            "backbones": [str(tiny_bert), str(big)], "n_trials": 3, "objectives": ["accuracy", "size_mb"],
            "pruner": {"name": "median", "startup_trials": 0},
            "enqueue": [{"backbone": str(big), "lr": 3e-3}, {"backbone": str(tiny_bert), "lr": 8e-3},
                        {"backbone": str(tiny_bert), "lr": 1e-6}],
            "search.lr": {"low": 1e-6, "high": 1e-2, "log": True}, **changes})
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(study))
        return path

    return write


def test_a_two_objective_search_keeps_the_front_prunes_nothing_and_registers_the_chosen_trial(
    two_objective_study, capsys
):
    path = two_objective_study(select={"rule": "within", "tolerance": 0.2})
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pruning: off, the median pruner unused: Optuna prunes single-objective studies only" in out
    study = optuna_study("tiny")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"] and study.metric_names == ["accuracy", "size_mb"]
    trials = study.get_trials()
    # Every trial ran its 4 epochs, even the one that learned nothing (the median pruner would have stopped it).
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    big_trial, small_trial, idle = trials
    assert big_trial.values[1] > small_trial.values[1] == idle.values[1]
    assert idle.values[0] < small_trial.values[0]
    front_numbers = sorted(t.number for t in study.best_trials)
    assert 2 not in front_numbers and 1 in front_numbers
    # The small model is within 0.2 of the best accuracy (whichever it is) and smaller: chosen.
    assert "select within (tolerance 0.2) chose trial 1" in out
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    assert version.tags["trial_number"] == "1" and float(version.tags["size_mb"]) == pytest.approx(small_trial.values[1], abs=1e-3)
    parents, _ = runs("tiny")
    logged = json.loads(Path(store().download_artifacts(parents[0].info.run_id, "pareto_front.json")).read_text())
    assert logged["objectives"] == ["accuracy", "size_mb"] and logged["chosen"] == 1
    assert [f["trial"] for f in logged["front"]] == front_numbers
    # The report: the front in words, and the interactive plot with the chosen trial starred.
    assert main(["report", str(path), "--output", str(path.parent / "report.html")]) == 0
    report = capsys.readouterr().out
    assert f"Pareto front: trials {', '.join(map(str, front_numbers))}" in report or \
        f"Pareto front: trial {front_numbers[0]};" in report
    assert "the select rule (within, tolerance 0.2) chose trial 1" in report
    page = (path.parent / "report.html").read_text()
    assert 'id="pareto-front"' in page and '"name":"chosen"' in page.replace(" ", "")


def test_resuming_with_other_objectives_is_refused_and_another_select_rule_is_not(two_objective_study, capsys):
    path = two_objective_study(n_trials=1, select={"rule": "best"})
    assert main(["search", str(path)]) == 0
    capsys.readouterr()
    study = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**study, "select": {"rule": "knee"}}))
    assert main(["search", str(path)]) == 0
    assert optuna_study("tiny").user_attrs["ftsearch.select"] == {"rule": "knee", "tolerance": 0.01}
    path.write_text(yaml.safe_dump({**study, "objectives": ["accuracy", "latency_ms"]}))
    assert main(["search", str(path)]) == 2
    assert "objectives" in capsys.readouterr().err
    assert optuna.study.get_all_study_names(optuna_study("tiny")._storage) == ["tiny"]
