"""The real pipeline end to end on a tiny BERT and tiny data: search, tracking, registry, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
import yaml

from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.distributed.storage import open_storage
from ftsearch.study import open_study
from tests.helpers import PARENT, optuna_study, runs, store, tiny_study


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_bert, tiny_reviews):
    """One 2-trial search, shared by the assertions below (state kept in its own folder)."""
    root = tmp_path_factory.mktemp("searched")
    study_file = root / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(tiny_study(tiny_bert, tiny_reviews)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTSEARCH_STATE_DIR", str(root / "mlruns"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["search", str(study_file)]) == 0
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root


def mlflow_signature(version):
    from mlflow.models import get_model_info

    return get_model_info(version.source).signature


@pytest.fixture
def in_searched(searched, monkeypatch):
    monkeypatch.setenv("FTSEARCH_STATE_DIR", str(searched / "mlruns"))
    return searched


def test_one_parent_and_a_child_run_per_trial_with_epoch_curves(in_searched):
    parents, children = runs("tiny")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    client = store()
    for child in children:
        assert child.data.tags[PARENT] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["ftsearch.state"] == "COMPLETE"
        assert {"lr", "batch_size", "freeze_depth", "backbone", "token_mask", "trainable_params"} <= set(child.data.params)
        curve = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in curve] == [1, 2, 3, 4]
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 4
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"trial_config.json", "confusion_matrix.png"} <= artifacts
    # The classical baseline, for context: the cue words make this easy for TF-IDF too.
    assert parent.data.tags["baseline"].startswith("TF-IDF")
    assert parent.data.metrics["baseline_val_accuracy"] >= 0.9
    assert {"baseline_test_accuracy", "baseline_val_f1"} <= set(parent.data.metrics)
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "best_params.json", "config.json",
            "data_report.json"} <= parent_artifacts


def test_the_experiment_is_a_fine_tuning_one_and_each_trial_measured_its_served_cost(in_searched):
    parents, children = runs("tiny")
    # The MLflow UI opens a fine-tuning experiment on its runs, not on the GenAI overview.
    assert store().get_experiment(parents[0].info.experiment_id).tags["mlflow.experimentKind"] == "finetuning"
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    for child in children:
        cost = child.data.metrics
        assert 0 < cost["latency_ms_b32"] and 0 < cost["latency_ms"] and cost["params_m"] > 0.01 and cost["size_mb"] > 0
    best = store().get_run(version.tags["run_id"]).data.metrics
    assert float(version.tags["latency_ms"]) == pytest.approx(best["latency_ms"], abs=1e-4)


def test_each_trial_is_a_logged_model_ranked_by_its_metrics_and_the_registered_one_is_the_best_trials(in_searched):
    client = store()
    parents, _ = runs("tiny")
    experiment = parents[0].info.experiment_id
    models = {m.name: m for m in client.search_logged_models(experiment_ids=[experiment])}
    study = optuna_study("tiny")
    assert set(models) == {f"trial-{t.number}" for t in study.trials}
    for trial in study.trials:
        model = models[f"trial-{trial.number}"]
        assert trial.user_attrs["ftsearch.model_id"] == model.model_id and model.status.name == "READY"
        assert model.source_run_id == trial.user_attrs["mlflow_run_id"] and model.model_type == "text-classification"
        assert model.params["lr"] == str(trial.params["lr"]) and model.tags["ftsearch.trial_number"] == str(trial.number)
        # Its metrics are its run's at the best epoch: what the models view ranks it by.
        linked = {m.key: m for m in model.metrics}
        best_epoch = int(client.get_run(model.source_run_id).data.metrics["best_epoch"])
        assert linked["val_accuracy"].value == trial.value and linked["val_accuracy"].step == best_epoch
        assert {"latency_ms", "latency_ms_b32", "size_mb", "params_m", "val_f1"} <= set(linked)
    version = client.get_model_version_by_alias("tiny-sentiment", "candidate")
    best = study.best_trial
    registered = client.get_logged_model(best.user_attrs["ftsearch.model_id"])
    assert version.source == f"models:/{registered.model_id}" and version.tags["trial_number"] == str(best.number)
    assert json.loads(registered.tags["mlflow.modelVersions"]) == [{"name": "tiny-sentiment", "version": version.version}]
    # The test split's metrics joined the registered trial's model, measured on the test dataset.
    test = {m.key: m for m in registered.metrics if m.key.startswith("test_")}
    assert test["test_accuracy"].value == pytest.approx(float(version.tags["test_accuracy"]), abs=1e-6)
    assert test["test_accuracy"].dataset_name == "tiny-test"
    assert test["test_accuracy"].dataset_digest == study.user_attrs["ftsearch.data_digests"]["test"]


def test_training_learns_the_task(in_searched):
    _, children = runs("tiny")
    client = store()
    best_curve = max(
        ([m.value for m in client.get_metric_history(c.info.run_id, "val_accuracy")] for c in children),
        key=max,
    )
    assert max(best_curve) >= 0.9
    losses = [m.value for m in client.get_metric_history(children[0].info.run_id, "train_loss")]
    assert losses[-1] < losses[0]


def test_trial_numbers_and_run_ids_point_both_ways(in_searched):
    study = optuna_study("tiny")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    client = store()
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["ftsearch.trial_number"] == str(trial.number)
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
    assert study.user_attrs["mlflow_parent_run_id"] == runs("tiny")[0][0].info.run_id


def test_best_trial_is_registered_as_candidate_with_test_metrics(in_searched):
    study = optuna_study("tiny")
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    assert version.tags["trial_number"] == str(study.best_trial.number)
    assert version.tags["run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    assert float(version.tags["test_accuracy"]) >= 0.9
    best_run = store().get_run(version.tags["run_id"])
    assert best_run.data.metrics["test_accuracy"] == pytest.approx(float(version.tags["test_accuracy"]), abs=1e-5)
    assert best_run.info.status == "FINISHED"
    # The weights moved into the registry; no checkpoint is left behind.
    assert not any((in_searched / "mlruns" / "checkpoints").glob("*/trial-*"))


def test_the_registered_model_is_a_logged_model_of_the_best_run_in_its_experiment(in_searched):
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    best_run = store().get_run(version.tags["run_id"])
    logged = store().get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == best_run.info.run_id and logged.experiment_id == best_run.info.experiment_id
    assert logged.status == "READY" and logged.params["lr"] == best_run.data.params["lr"]
    assert [m.model_id for m in best_run.outputs.model_outputs] == [logged.model_id]
    # Its files live under the study's state directory, not in MLflow's default experiment.
    assert Path(logged.artifact_location.removeprefix("file://")).is_relative_to(in_searched / "mlruns")
    signature = mlflow_signature(version)
    assert signature.inputs.input_names() == ["text"] and signature.outputs.input_names() == ["label", "prob_neg", "prob_pos"]


def test_promote_then_predict_with_champion(in_searched, capsys):
    study_file = str(in_searched / "tiny.yaml")
    assert main(["promote", study_file]) == 0
    assert "promoted tiny-sentiment v1" in capsys.readouterr().out
    assert str(store().get_model_version_by_alias("tiny-sentiment", "champion").version) == "1"
    assert main(["promote", study_file]) == 0
    assert "already the champion" in capsys.readouterr().out

    assert main(["predict", "models:/tiny-sentiment@champion", "great superb loved film", "awful dull hated plot"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["pos", "neg"]
    assert "prob_" not in lines[0] and "pos 0." in lines[0]


def test_rerunning_a_finished_study_runs_nothing_new(in_searched, capsys):
    assert main(["search", str(in_searched / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "2 trial(s) done, 0 to run" in out and "already registered" in out
    parents, children = runs("tiny")
    assert len(parents) == 1 and len(children) == 2
    assert len(store().search_model_versions("name = 'tiny-sentiment'")) == 1


def test_interrupted_study_resumes_under_the_same_parent(write_study, monkeypatch, capsys):
    import ftsearch.trial as trials_module

    real_fit, calls = trials_module.fit, []

    def interrupt_second_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trials_module, "fit", interrupt_second_trial)
    path = str(write_study())
    assert main(["search", path]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    parents, children = runs("tiny")
    assert parents[0].info.status == "KILLED"
    assert sorted(c.data.tags["ftsearch.state"] for c in children) == ["COMPLETE", "KILLED"]
    assert all(c.info.status != "RUNNING" for c in children)

    assert main(["search", path]) == 0
    parents, children = runs("tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and all(c.data.tags[PARENT] == parents[0].info.run_id for c in children)
    states = [t.state.name for t in optuna_study("tiny").trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1


def test_fresh_starts_a_new_study_and_keeps_the_old(write_study):
    path = str(write_study(n_trials=1))
    assert main(["search", path]) == 0
    assert main(["search", path, "--fresh"]) == 0
    assert optuna_study("tiny").trials and optuna_study("tiny.2").trials
    parents, _ = runs("tiny")
    assert len(parents) == 2


def test_resuming_with_a_changed_search_space_is_refused(write_study, capsys):
    path = str(write_study(n_trials=1))
    assert main(["search", path]) == 0
    assert main(["search", path, "--set", "search.batch_size=[8]"]) == 2
    assert "search.batch_size changed" in capsys.readouterr().err
    # n_trials is not part of the search space: raising it resumes the study.
    assert main(["search", path, "--n-trials", "2"]) == 0
    assert len(optuna_study("tiny").trials) == 2


def test_a_bad_trial_is_pruned_and_its_run_finished_with_the_pruned_tag(write_study):
    path = write_study(pruner={"name": "median", "min_epochs": 1, "startup_trials": 1})
    config = load_study(str(path), cpu=True)
    study = open_study(config, open_storage(), fresh=False)
    study.enqueue_trial({"lr": 8e-3})
    study.enqueue_trial({"lr": 0.9})  # absurd: it cannot learn anything in its first epoch
    assert main(["search", str(path)]) == 0
    trials = optuna_study("tiny").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    pruned = store().get_run(trials[1].user_attrs["mlflow_run_id"])
    assert pruned.info.status == "FINISHED"
    assert pruned.data.tags["ftsearch.state"] == "PRUNED"
    # Either the median pruner stops it after epoch 1, or its loss blows up first.
    reason = pruned.data.tags["ftsearch.reason"]
    assert "pruned by the median pruner after epoch 1" in reason or "non-finite loss" in reason
    assert len(store().get_metric_history(pruned.info.run_id, "val_accuracy")) == 1


def test_non_finite_loss_prunes_with_that_reason(write_study, tiny_bert, tmp_path):
    import torch
    from transformers import BertModel

    broken = tmp_path / "nan-bert"
    model = BertModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        model.pooler.dense.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    (broken / "tokenizer_config.json").write_text((tiny_bert / "tokenizer_config.json").read_text())
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json"):
        if (tiny_bert / name).exists():
            (broken / name).write_text((tiny_bert / name).read_text())
    path = write_study(backbones=[str(broken)], n_trials=1)
    assert main(["search", str(path)]) == 2  # no trial completed: nothing to register
    trial = optuna_study("tiny").trials[0]
    assert trial.state.name == "PRUNED"
    run = store().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "non-finite loss" in run.data.tags["ftsearch.reason"]


def test_promote_keeps_a_better_champion_unless_forced(write_study, capsys, monkeypatch):
    path = str(write_study(n_trials=1))
    assert main(["search", path]) == 0
    assert main(["promote", path]) == 0
    client = store()
    # A second study generation whose candidate scores worse on the test split.
    assert main(["search", path, "--fresh"]) == 0
    client.set_model_version_tag("tiny-sentiment", "2", "test_accuracy", "0.1")
    capsys.readouterr()
    assert main(["promote", path]) == 0
    assert "kept champion tiny-sentiment v1" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("tiny-sentiment", "champion").version) == "1"
    assert main(["promote", path, "--force"]) == 0
    assert "forced over v1" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("tiny-sentiment", "champion").version) == "2"


def test_trial_config_artifact_is_the_sampled_config(in_searched):
    client = store()
    _, children = runs("tiny")
    path = client.download_artifacts(children[0].info.run_id, "trial_config.json")
    sampled = json.loads(Path(path).read_text())
    assert sampled["lr"] == pytest.approx(float(children[0].data.params["lr"]))
    assert sampled["epochs"] == 4


def test_a_trial_that_raises_fails_its_run_and_the_study_goes_on(write_study, monkeypatch, capsys):
    import ftsearch.trial as trials_module

    real_fit, calls = trials_module.fit, []

    def broken_first_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trials_module, "fit", broken_first_trial)
    assert main(["search", str(write_study(n_trials=1))]) == 0
    trials = optuna_study("tiny").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    failed = store().get_run(trials[0].user_attrs["mlflow_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["ftsearch.state"] == "FAIL"
    assert failed.data.tags["ftsearch.reason"] == "RuntimeError: disk on fire"


def test_when_every_trial_fails_the_search_says_why(write_study, monkeypatch, capsys):
    import ftsearch.trial as trials_module

    def always_broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trials_module, "fit", always_broken)
    assert main(["search", str(write_study(n_trials=1))]) == 2
    captured = capsys.readouterr()
    assert "stopping: 3 trials failed in a row" in captured.out
    assert "no trial completed (0 complete, 0 pruned, 3 fail)" in captured.err
    assert "first reason: RuntimeError: disk on fire" in captured.err
    parents, children = runs("tiny")
    assert len(children) == 3
    assert parents[0].info.status == "FAILED" and all(c.info.status == "FAILED" for c in children)


def test_trial_runs_log_system_metrics_unless_the_study_or_the_machine_says_not_to(write_study, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's: 10 s, longer than a tiny trial
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")  # the other tests' switch: here the study decides
    assert main(["search", str(write_study(n_trials=1))]) == 0
    # The study file turns them off; MLflow's own switch, set on this machine, overrides the file.
    assert main(["search", str(write_study(n_trials=2, system_metrics=False))]) == 0
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert main(["search", str(write_study(n_trials=3))]) == 0
    _, children = runs("tiny")
    logged = {int(c.data.tags["ftsearch.trial_number"]): {k for k in c.data.metrics if k.startswith("system/")}
              for c in children}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= logged[0]
    assert logged[1] == logged[2] == set()


def test_registration_is_all_or_nothing(write_study, monkeypatch, capsys):
    from mlflow import MlflowClient as Client

    def alias_fails(self, *args, **kwargs):
        raise RuntimeError("registry went away")

    path = str(write_study(n_trials=1))
    with monkeypatch.context() as patch:
        patch.setattr(Client, "set_registered_model_alias", alias_fails)
        with pytest.raises(RuntimeError, match="registry went away"):
            main(["search", path])
    assert store().search_model_versions("name = 'tiny-sentiment'") == []
    assert runs("tiny")[0][0].info.status == "FAILED"

    # The rerun registers the same best trial completely; its weights were kept for this.
    assert main(["search", path]) == 0
    versions = store().search_model_versions("name = 'tiny-sentiment'")
    assert len(versions) == 1 and versions[0].tags["ftsearch.registration"] == "complete"
    assert str(store().get_model_version_by_alias("tiny-sentiment", "candidate").version) == str(versions[0].version)


def test_a_version_left_half_written_by_a_crash_is_replaced(write_study, monkeypatch):
    from mlflow import MlflowClient as Client

    from ftsearch import publish

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    # As if the process were killed after registering the version, before finishing it: the
    # rollback itself never runs.
    path = str(write_study(n_trials=1))
    with monkeypatch.context() as patch:
        patch.setattr(Client, "set_model_version_tag", killed)
        patch.setattr(Client, "delete_model_version", lambda self, *a, **k: None)
        assert main(["search", path]) == 130
    client = store()
    [half] = client.search_model_versions("name = 'tiny-sentiment'")
    assert publish.registered_version("tiny-sentiment", half.tags["run_id"]) is None

    assert main(["search", path]) == 0
    [version] = client.search_model_versions("name = 'tiny-sentiment'")
    assert version.tags["ftsearch.registration"] == "complete" and version.version != half.version
    assert client.get_model_version_by_alias("tiny-sentiment", "candidate").version == version.version


def test_trials_that_freeze_blocks_train_from_the_shared_prefix_cache(write_study, capsys):
    path = write_study(
        "cached", n_trials=2,
        **{"search.freeze_depth": {"low": 1, "high": 1}, "search.augment": {}, "search.epochs": {"low": 2, "high": 2}},
    )
    assert main(["search", str(path)]) == 0
    _, children = runs("cached")
    notes = sorted((int(r.data.tags["ftsearch.trial_number"]), r.data.tags["ftsearch.feature_cache"]) for r in children)
    assert notes[0][1] == "depth 1: train written by the first epoch, val written by the first epoch"
    assert notes[1][1] == "depth 1: train hit, val hit"
    assert all(r.info.status == "FINISHED" and "val_accuracy" in r.data.metrics for r in children)
    # The registered model is the full classifier: it predicts from raw text.
    assert main(["predict", "models:/tiny-sentiment@candidate", "a wonderful superb film"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split("\t")[0] in {"neg", "pos"}
