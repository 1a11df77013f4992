"""Re-evaluation over seeds: the top configurations trained again with other seeds, the best mean
chosen (not the luckiest seed), every run tracked and ended, and an interrupted re-evaluation
that goes on where it stopped."""

from __future__ import annotations

import mlflow
import pytest

from ftsearch import reevaluation, train
from ftsearch.cli import main
from ftsearch.generations import top_trials
from ftsearch.problems import problem_type
from ftsearch.reevaluation import REEVALUATION_OF_TAG, REEVALUATIONS_ATTR, Configuration, SeedRun
from tests.helpers import optuna_study, runs, store

CLASSIFICATION = problem_type("single-label-classification")
REGRESSION = problem_type("regression")


def _configuration(trial: int, values: list[float | None]) -> Configuration:
    return Configuration(trial, [SeedRun(100 + i, v, f"run-{trial}-{i}") for i, v in enumerate(values)])


def test_the_configuration_with_the_best_mean_wins_not_the_luckiest_seed():
    lucky = _configuration(0, [0.95, 0.80, 0.81])  # the study's best trial, by one lucky seed
    steady = _configuration(1, [0.90, 0.89, 0.91])
    unreliable = _configuration(2, [0.93, None, 0.92])  # diverged once: after every reliable one
    ranked = reevaluation.rank([lucky, steady, unreliable], CLASSIFICATION, "accuracy")
    assert [c.trial for c in ranked] == [1, 0, 2]
    assert steady.mean == pytest.approx(0.90) and steady.std == pytest.approx(0.01)
    assert unreliable.failed == 1 and unreliable.values == [0.93, 0.92]
    # The configuration is represented by its best seed; the trial's own among equals.
    assert steady.best_run(CLASSIFICATION, "accuracy").seed == 102
    assert _configuration(3, [0.9, 0.9]).best_run(CLASSIFICATION, "accuracy").seed == 100
    # Lower is better for an error; equal means keep the better-ranked trial first.
    low, high = _configuration(4, [0.5, 0.7]), _configuration(5, [0.3, 0.4])
    assert [c.trial for c in reevaluation.rank([low, high], REGRESSION, "rmse")] == [5, 4]
    tie = [_configuration(6, [0.8, 0.9]), _configuration(7, [0.9, 0.8])]
    assert [c.trial for c in reevaluation.rank(tie, CLASSIFICATION, "accuracy")] == [6, 7]
    # Equal means (hymenoptera's 217 of 228 images twice): the steadier configuration first.
    jumpy, steadier = _configuration(11, [74 / 76, 71 / 76, 72 / 76]), _configuration(6, [73 / 76, 72 / 76, 72 / 76])
    assert [c.trial for c in reevaluation.rank([jumpy, steadier], CLASSIFICATION, "accuracy")] == [6, 11]


def _study_file(write_study, **selection):
    return write_study(n_trials=3, **{"search.epochs": {"low": 2, "high": 2}},
                       selection={"top_k": 2, "seeds": 3, "ensemble": False, "blend_baseline": False,
                                  "soup": False, **selection})


def test_the_top_configurations_are_trained_again_and_the_best_mean_is_registered(write_study, state_dir, capsys,
                                                                                 monkeypatch):
    # On this easy data the seeds tie; a re-evaluation's seed is made the winner, so that its model is registered.
    monkeypatch.setattr(Configuration, "best_run", lambda self, problem, metric: self.runs[-1])
    path = _study_file(write_study)
    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "re-evaluating the top 2 configurations with 3 seeds each: 4 more training run(s)" in out
    assert "<- best mean" in out

    study = optuna_study("tiny")
    assert len(study.trials) == 3  # re-evaluations are not trials
    recorded = study.user_attrs[REEVALUATIONS_ATTR]
    top = top_trials(study, 2)
    assert sorted(recorded) == sorted(str(t.number) for t in top)
    assert all(len(seeds) == 2 and all(r["state"] == "COMPLETE" for r in seeds) for seeds in recorded.values())

    # Each re-evaluation is a finished child run of the study, tagged with its trial and seed.
    parent, children = runs("tiny")[0][0], runs("tiny")[1]
    again = [r for r in children if REEVALUATION_OF_TAG in r.data.tags]
    assert len(again) == 4 and all(r.info.status == "FINISHED" for r in again)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in again)
    assert {r.data.params["seed"] for r in again} == {str(s["seed"]) for seeds in recorded.values() for s in seeds}
    assert all("val_accuracy" in r.data.metrics for r in again)

    # The registered model is the best seed of the configuration with the best mean, said with its spread.
    logged = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/candidates.json")
    configurations = logged["reevaluation"]
    assert len(configurations) == 2 and all(c["seeds"] == 3 for c in configurations)
    means = [c["mean_val_accuracy"] for c in configurations]
    assert means == sorted(means, reverse=True)
    winner = configurations[0]
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    assert version.tags["trial_number"] == str(winner["trial"])
    assert version.tags["run_id"] == winner["runs"][-1]["run_id"]  # a re-evaluation's run
    assert version.tags["selection"] == f"trial {winner['trial']} (its configuration with seed {winner['runs'][-1]['seed']})"
    assert float(version.tags["val_accuracy_mean"]) == pytest.approx(winner["mean_val_accuracy"], abs=1e-6)
    assert float(version.tags["val_accuracy_std"]) == pytest.approx(winner["std_val_accuracy"], abs=1e-6)
    assert version.tags["seeds"] == "3"
    assert "test_accuracy" in mlflow.get_run(version.tags["run_id"]).data.metrics  # scored once, where it was trained
    assert not any((state_dir / "checkpoints").glob("*/*"))

    # The report shows mean +- std per configuration.
    capsys.readouterr()
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"trial {winner['trial']}" in out and "±" in out

    # Searching again registers nothing and trains nothing more.
    assert main(["search", str(path)]) == 0
    assert len(store().search_model_versions("name = 'tiny-sentiment'")) == 1
    assert len([r for r in runs("tiny")[1] if REEVALUATION_OF_TAG in r.data.tags]) == 4


def test_an_interrupted_reevaluation_ends_its_run_and_goes_on_when_the_search_is_resumed(write_study, monkeypatch):
    path = _study_file(write_study, top_k=1, seeds=3)
    real_fit, calls = train.fit, []

    def interrupted_second(model, train_loader, val_loader, settings, on_epoch_end, **kwargs):
        calls.append(kwargs.get("checkpoint"))

        def after_epoch(metrics):
            if len(calls) == 5:  # 3 trials, one re-evaluation, then Ctrl-C after the second's first epoch
                raise KeyboardInterrupt
            return on_epoch_end(metrics)

        return real_fit(model, train_loader, val_loader, settings, after_epoch, **kwargs)

    monkeypatch.setattr("ftsearch.trial.fit", interrupted_second)
    assert main(["search", str(path)]) == 130
    assert not [r for r in runs("tiny")[1] + runs("tiny")[0] if r.info.status == "RUNNING"]
    killed = [r for r in runs("tiny")[1] if REEVALUATION_OF_TAG in r.data.tags and r.info.status == "KILLED"]
    assert len(killed) == 1
    seeds = next(iter(optuna_study("tiny").user_attrs[REEVALUATIONS_ATTR].values()))
    assert [r["state"] for r in seeds] == ["COMPLETE", "RUNNING"]  # the first seed's result, the second's run
    assert not store().search_model_versions("name = 'tiny-sentiment'")

    monkeypatch.setattr("ftsearch.trial.fit", real_fit)
    assert main(["search", str(path)]) == 0
    recorded = optuna_study("tiny").user_attrs[REEVALUATIONS_ATTR]
    assert [[r["state"] for r in seeds] for seeds in recorded.values()] == [["COMPLETE", "COMPLETE"]]
    finished = [r for r in runs("tiny")[1] if REEVALUATION_OF_TAG in r.data.tags and r.info.status == "FINISHED"]
    assert len(finished) == 2  # the first is not trained again
    resumed = next(r for r in finished if r.data.params["seed"] == str(recorded_seed(recorded)))
    assert resumed.data.params["resumed_from_epoch"] == "1"  # the second went on from its first epoch
    assert sorted(m.step for m in store().get_metric_history(resumed.info.run_id, "val_accuracy")) == [1, 2]
    assert store().get_model_version_by_alias("tiny-sentiment", "candidate").tags["seeds"] == "3"


def recorded_seed(recorded: dict) -> int:
    """The seed trained last (the one interrupted)."""
    return next(iter(recorded.values()))[-1]["seed"]
