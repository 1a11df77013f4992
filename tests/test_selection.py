"""Choosing what to register: candidates judged on validation, and a registered ensemble or blend
that predicts what its members predict together."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import Model
from scipy.special import expit, softmax

from ftsearch import selection
from ftsearch.cli import main
from ftsearch.modalities.base import BaselineMember
from ftsearch.predictor import BASELINE_FILE, TextBaseline, TextClassifier, read_meta
from ftsearch.problems import problem_type
from tests.helpers import optuna_study, runs, store

CLASSIFICATION = problem_type("single-label-classification")


def _logits(probs_of_class_1: list[float]) -> np.ndarray:
    p = np.asarray(probs_of_class_1)
    return np.log(np.stack([1 - p, p], axis=1)).astype(np.float32)


def _member(number: int, probs: list[float], seconds: float = 0.001) -> selection.Member:
    return selection.Member(number, Path(f"trial-{number}"), CLASSIFICATION, {"val": _logits(probs)},
                            seconds_per_example=seconds)


Y = np.array([1, 1, 1, 0, 0, 0])


def test_the_ensemble_is_chosen_only_when_it_beats_the_best_on_validation():
    # Each trial gets one example wrong, a different one; averaged, they get all six right.
    best = _member(0, [0.9, 0.9, 0.4, 0.1, 0.1, 0.1])
    second = _member(1, [0.9, 0.4, 0.9, 0.1, 0.1, 0.1])
    third = _member(2, [0.4, 0.9, 0.9, 0.1, 0.1, 0.1])
    found = selection.candidates([best, second, third], Y, CLASSIFICATION, "accuracy", ensemble=True, baseline=None)
    assert [c.kind for c in found] == ["best", "ensemble"]
    assert found[0].val["accuracy"] == pytest.approx(5 / 6) and found[1].val["accuracy"] == 1.0
    chosen = selection.choose(found, CLASSIFICATION, "accuracy")
    assert chosen.kind == "ensemble" and chosen.members == [0, 1, 2] and chosen.weights == pytest.approx([1 / 3] * 3)
    assert chosen.seconds_per_example == pytest.approx(0.003)  # every member runs

    # Members that make the same mistake: the ensemble only ties, and the single model is kept.
    same = [_member(n, [0.9, 0.9, 0.4, 0.1, 0.1, 0.1]) for n in range(3)]
    found = selection.candidates(same, Y, CLASSIFICATION, "accuracy", ensemble=True, baseline=None)
    assert selection.choose(found, CLASSIFICATION, "accuracy").kind == "best"


def test_the_blend_weight_is_tuned_on_validation_and_the_cheaper_of_two_equals_wins():
    best = _member(0, [0.9, 0.9, 0.45, 0.1, 0.1, 0.1])
    other = _member(1, [0.9, 0.9, 0.45, 0.1, 0.1, 0.1])
    # The baseline is unsure everywhere but leans the right way on the example the model gets wrong.
    baseline = BaselineMember({"val": _logits([0.55, 0.55, 0.9, 0.45, 0.45, 0.45])}, Path(BASELINE_FILE), 0.0001)
    found = selection.candidates([best, other], Y, CLASSIFICATION, "accuracy", ensemble=True, baseline=baseline)
    blend = next(c for c in found if c.kind == "blend")
    assert blend.val["accuracy"] == 1.0 and blend.members == [0]
    # The smallest baseline weight in the grid that turns the third example: 0.45 + w (0.9 - 0.45) > 0.5.
    assert blend.weights[-1] == pytest.approx(0.2) and sum(blend.weights) == pytest.approx(1.0)
    assert blend.description == "trial 0 + baseline (weight 0.20)"
    assert blend.seconds_per_example == pytest.approx(0.0011)
    chosen = selection.choose(found, CLASSIFICATION, "accuracy")
    assert chosen is blend
    report = selection.report(found, chosen, "accuracy", {"test_accuracy": 0.9})
    assert report["chosen"] == found.index(blend) and report["candidates"][report["chosen"]]["models"] == 2


@pytest.mark.parametrize("name", ["single-label-classification", "multi-label-classification", "regression"])
def test_combining_averages_what_the_members_predict(name):
    problem = problem_type(name)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    if name == "regression":
        a, b = a[:, :1], b[:, :1]
    combined = problem.combine([a, b], [0.25, 0.75])
    if name == "single-label-classification":
        assert softmax(combined, axis=1) == pytest.approx(0.25 * softmax(a, axis=1) + 0.75 * softmax(b, axis=1), abs=1e-6)
    elif name == "multi-label-classification":
        assert expit(combined) == pytest.approx(0.25 * expit(a) + 0.75 * expit(b), abs=1e-5)
    else:
        assert combined == pytest.approx(0.25 * a + 0.75 * b)


def _search_choosing(write_study, monkeypatch, kind: str):
    """A 3-trial search whose choice is forced to the candidate of ``kind`` (which on this easy
    data only ties the best), to follow that candidate through registration and serving."""
    def forced(found, problem, metric):
        return next((c for c in found if c.kind == kind), found[0])

    monkeypatch.setattr(selection, "choose", forced)
    assert main(["search", str(write_study(n_trials=3, **{"search.epochs": {"low": 2, "high": 2}}))]) == 0
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    root = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-sentiment/{version.version}"))
    return version, root / Model.load(root).flavors["python_function"]["artifacts"]["model"]["path"]


TEXTS = ["great superb loved film", "awful dull hated plot", "the movie was a story"]


def test_a_registered_ensemble_predicts_the_average_of_its_members(write_study, monkeypatch, state_dir, capsys):
    version, folder = _search_choosing(write_study, monkeypatch, "ensemble")
    study = optuna_study("tiny")
    parent = runs("tiny")[0][0]
    assert version.tags["selection"].startswith("ensemble of trials ")
    assert version.tags["run_id"] == parent.info.run_id  # the study's model, not one trial's
    assert version.tags["ftsearch.selected_from"] == "0,1,2"
    assert version.tags["models"] == "3" and float(version.tags["ms_per_example"]) > 0
    assert float(version.tags["test_accuracy"]) == pytest.approx(parent.data.metrics["test_accuracy"], abs=1e-5)
    members = read_meta(folder)["ensemble"]["members"]
    assert sorted(m["trial"] for m in members) == [t.number for t in study.trials]

    served = mlflow.pyfunc.load_model(f"models:/tiny-sentiment/{version.version}").predict(pd.DataFrame({"text": TEXTS}))
    each = [TextClassifier(folder / m["path"]).predict(TEXTS) for m in members]
    expected = sum(m["weight"] * frame[["prob_neg", "prob_pos"]].to_numpy() for m, frame in zip(members, each, strict=True))
    assert served[["prob_neg", "prob_pos"]].to_numpy() == pytest.approx(expected, abs=1e-5)
    assert list(served["label"]) == ["pos", "neg", served["label"][2]]

    # What the parent run says of the choice; nothing is left on disk.
    logged = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/candidates.json")
    assert [c["kind"] for c in logged["candidates"]] == ["best", "ensemble", "blend"]
    assert logged["candidates"][logged["chosen"]]["kind"] == "ensemble" and "test_accuracy" in logged["test"]
    assert all(c["ms_per_example"] > 0 for c in logged["candidates"])
    assert not any((state_dir / "checkpoints").glob("*/*"))

    # Searching again finds the combination of these same trials registered, and registers nothing.
    path = write_study(n_trials=3, **{"search.epochs": {"low": 2, "high": 2}})
    assert main(["search", str(path)]) == 0
    assert len(store().search_model_versions("name = 'tiny-sentiment'")) == 1
    # One more trial that cannot beat the best (validation accuracy 1.0): the best's weights are in
    # the registered ensemble, which stays the study's model.
    assert study.best_value == 1.0
    capsys.readouterr()
    assert main(["search", str(path), "--n-trials", "4"]) == 0
    assert "registered before; it stays the study's model" in capsys.readouterr().out
    assert len(store().search_model_versions("name = 'tiny-sentiment'")) == 1
    assert not any((state_dir / "checkpoints").glob("*/trial-*"))


def test_a_registered_blend_serves_the_fine_tuned_model_and_the_tfidf_baseline_together(write_study, monkeypatch):
    version, folder = _search_choosing(write_study, monkeypatch, "blend")
    members = read_meta(folder)["ensemble"]["members"]
    assert [m["path"] for m in members][-1] == BASELINE_FILE and len(members) == 2
    assert version.tags["selection"].startswith(f"trial {members[0]['trial']} + baseline (weight ")

    served = mlflow.pyfunc.load_model(f"models:/tiny-sentiment/{version.version}").predict(pd.DataFrame({"text": TEXTS}))
    model = TextClassifier(folder / members[0]["path"]).predict(TEXTS)[["prob_neg", "prob_pos"]].to_numpy()
    baseline = softmax(TextBaseline(folder / BASELINE_FILE, CLASSIFICATION, 2).outputs(TEXTS), axis=1)
    w = members[1]["weight"]
    assert served[["prob_neg", "prob_pos"]].to_numpy() == pytest.approx((1 - w) * model + w * baseline, abs=1e-5)


def test_members_outputs_are_in_the_splits_own_order(write_study, state_dir):
    # Text loaders batch by length; a member's outputs must still line up with the split's rows
    # (and so with the baseline's), or averaging them pairs up different examples.
    from ftsearch.data.text import target_array
    from ftsearch.study import SearchOptions, prepare

    path = write_study(n_trials=1, **{"search.epochs": {"low": 1, "high": 1}},
                       selection={"ensemble": False, "blend_baseline": False})
    assert main(["search", str(path)]) == 0
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    root = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-sentiment/{version.version}"))
    folder = root / Model.load(root).flavors["python_function"]["artifacts"]["model"]["path"]
    prepared = prepare(SearchOptions(study=str(path), quiet=True))
    val = prepared.modality.splits.val
    assert val["text"].str.split().str.len().nunique() > 1  # lengths differ: batching reorders them
    member = selection.trial_member(prepared.modality, prepared.device, 0, folder)
    assert (member.targets["val"] == target_array(val)).all()
    direct = TextClassifier(folder).outputs(val["text"].tolist())
    assert member.outputs["val"] == pytest.approx(direct, abs=1e-4)


def test_a_long_text_is_read_as_the_study_says_in_training_and_when_served(write_study):
    from ftsearch.study import SearchOptions, prepare

    path = write_study(n_trials=1, **{"search.epochs": {"low": 1, "high": 1}, "search.max_length": [8],
                                      "search.truncation": ["head_tail"]},
                       selection={"ensemble": False, "blend_baseline": False})
    assert main(["search", str(path)]) == 0
    version = store().get_model_version_by_alias("tiny-sentiment", "candidate")
    root = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-sentiment/{version.version}"))
    folder = root / Model.load(root).flavors["python_function"]["artifacts"]["model"]["path"]
    assert read_meta(folder)["truncation"] == "head_tail"
    prepared = prepare(SearchOptions(study=str(path), quiet=True))
    texts = prepared.modality.splits.val["text"].tolist()
    assert min(len(t.split()) for t in texts) > 6  # every review is longer than 8 tokens: each is cut
    member = selection.trial_member(prepared.modality, prepared.device, 0, folder)
    served = TextClassifier(folder)
    assert served.outputs(texts) == pytest.approx(member.outputs["val"], abs=1e-4)  # read as it was trained
    served.truncation = "head"
    assert served.outputs(texts) != pytest.approx(member.outputs["val"], abs=1e-4)


def _image_search_choosing(tiny_images, tiny_cnn, tmp_path, monkeypatch, kind: str):
    """A 2-trial image search whose choice is forced to ``kind``: its study file, the registered
    version, its folder and the val images (one of each class) served to it."""
    import yaml

    from tests.test_images import image_study

    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump(image_study(tiny_images, tiny_cnn, search={
        **image_study(tiny_images, tiny_cnn)["search"], "epochs": {"low": 2, "high": 2}})))
    monkeypatch.setattr(selection, "choose", lambda found, problem, metric: next(c for c in found if c.kind == kind))
    assert main(["search", str(path)]) == 0
    version = store().get_model_version_by_alias("tiny-shapes", "candidate")
    root = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-shapes/{version.version}"))
    folder = root / Model.load(root).flavors["python_function"]["artifacts"]["model"]["path"]
    images = [str(tiny_images / "val" / shape / "0.png") for shape in ("circle", "square")]
    served = mlflow.pyfunc.load_model(f"models:/tiny-shapes/{version.version}").predict(pd.DataFrame({"path": images}))
    return path, version, folder, images, served[["prob_circle", "prob_square"]].to_numpy()


def test_a_registered_image_ensemble_predicts_the_average_of_its_members(tiny_images, tiny_cnn, tmp_path, monkeypatch):
    from ftsearch.predictor import ImagePredictor

    _, version, folder, images, served = _image_search_choosing(tiny_images, tiny_cnn, tmp_path, monkeypatch, "ensemble")
    assert version.tags["selection"].startswith("ensemble of trials ")
    members = read_meta(folder)["ensemble"]["members"]
    assert len(members) == 2
    each = [ImagePredictor(folder / m["path"]).predict(images)[["prob_circle", "prob_square"]].to_numpy() for m in members]
    expected = sum(m["weight"] * probs for m, probs in zip(members, each, strict=True))
    assert served == pytest.approx(expected, abs=1e-5)


def test_a_registered_image_blend_serves_a_trial_and_the_linear_probe_as_one_model(tiny_images, tiny_cnn, tmp_path,
                                                                                     monkeypatch, state_dir):
    from sklearn.linear_model import LogisticRegression

    from ftsearch.modalities.image import BASELINE_FIT, PROBE_FOLDER
    from ftsearch.predictor import ImagePredictor
    from ftsearch.study import SearchOptions, prepare

    path, version, folder, images, served = _image_search_choosing(tiny_images, tiny_cnn, tmp_path, monkeypatch, "blend")
    members = read_meta(folder)["ensemble"]["members"]
    assert [m["path"] for m in members] == [f"trial-{members[0]['trial']}", PROBE_FOLDER]
    assert version.tags["selection"].startswith(f"trial {members[0]['trial']} + baseline (weight ")
    # The probe folder is the logistic regression on the frozen backbone's pooled features.
    modality = prepare(SearchOptions(study=str(path), quiet=True)).modality
    x_train, y_train = modality._baseline_features["train"]
    x_val, _ = modality._baseline_features["val"]
    expected = LogisticRegression(C=BASELINE_FIT["inverse_regularisation"],
                                  max_iter=BASELINE_FIT["max_iter"]).fit(x_train, y_train).predict_proba(x_val)
    paths = [p for p, _ in modality.splits.val]
    probe = ImagePredictor(folder / PROBE_FOLDER).predict(paths)[["prob_circle", "prob_square"]].to_numpy()
    assert probe == pytest.approx(expected, abs=1e-4)
    # Served: the trial and the probe averaged with the weight tuned on validation.
    trial = ImagePredictor(folder / members[0]["path"]).predict(images)[["prob_circle", "prob_square"]].to_numpy()
    w = members[1]["weight"]
    probe = ImagePredictor(folder / PROBE_FOLDER).predict(images)[["prob_circle", "prob_square"]].to_numpy()
    assert served == pytest.approx((1 - w) * trial + w * probe, abs=1e-5)
    assert not any((state_dir / "checkpoints").glob("*/*"))


def test_the_greedy_soup_adds_a_trial_only_when_validation_improves(monkeypatch, tmp_path):
    # What each averaged set of trials scores on validation, and which trials can be averaged.
    scores = {(0, 1): 0.9, (0, 1, 2): 0.85, (0, 1, 3): 0.95}
    tried = []

    def averaged(members, folder, modality, device, problem, metric, y_val):
        numbers = tuple(m.number for m in members)
        tried.append(numbers)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "soup").write_text(str(numbers))
        soup = selection.Member(members[0].number, folder, problem)
        return selection.Candidate("soup", list(numbers), [1 / len(numbers)] * len(numbers), problem,
                                   {"accuracy": scores.get(numbers, 0.5)}, 0.001, soup)

    monkeypatch.setattr(selection, "_averaged", averaged)
    monkeypatch.setattr(selection, "_tensor_shapes", lambda folder: {"w": folder.name == "trial-4"})  # trial 4: other shapes
    best = _member(0, [0.9, 0.9, 0.4, 0.1, 0.1, 0.1])  # 5 of 6
    best.targets["val"] = Y
    members = [best, *(_member(n, [0.5] * 6) for n in (1, 2, 3, 4, 5))]
    backbones = {0: "a", 1: "a", 2: "a", 3: "a", 4: "a", 5: "b"}  # trial 5: another backbone
    soup = selection.greedy_soup(members, backbones, None, None, CLASSIFICATION, "accuracy", tmp_path / "soup",
                                 print)
    # Trial 1 improves on the best (0.83 -> 0.9), trial 2 would lower it, trial 3 raises it again;
    # trials 4 and 5 cannot be averaged with the best and are never tried.
    assert tried == [(0, 1), (0, 1, 2), (0, 1, 3)]
    assert soup.members == [0, 1, 3] and soup.models == 1 and soup.val["accuracy"] == 0.95
    assert soup.description == "weight soup of trials 0, 1, 3"
    assert (tmp_path / "soup" / "soup").read_text() == "(0, 1, 3)" and not (tmp_path / "soup.trying").exists()
    # Nothing improves on the best: no soup.
    scores.clear()
    assert selection.greedy_soup(members, backbones, None, None, CLASSIFICATION, "accuracy", tmp_path / "none",
                                 print) is None


def test_a_registered_soup_is_one_model_whose_weights_are_its_trials_average(write_study, monkeypatch):
    from safetensors.torch import load_file

    from ftsearch.problems.classification import SingleLabelClassification

    real_averaged, averages = selection._averaged, []

    def recorded(members, folder, *args):
        candidate = real_averaged(members, folder, *args)
        states = [load_file(str(m.folder / "model.safetensors")) for m in members]
        averages.append({k: sum(s[k].float() for s in states) / len(states) for k in states[0]})
        return candidate

    monkeypatch.setattr(selection, "_averaged", recorded)
    # On this easy data nothing beats the best's validation accuracy of 1.0: every trial is let in.
    monkeypatch.setattr(SingleLabelClassification, "better", lambda self, metric, value, than: True)
    version, folder = _search_choosing(write_study, monkeypatch, "soup")
    described = version.tags["selection"]
    assert described.startswith("weight soup of trials ") and len(described.split(", ")) == 3  # all three let in
    assert version.tags["models"] == "1" and "ensemble" not in read_meta(folder)  # a plain model folder
    served = load_file(str(folder / "model.safetensors"))
    expected = averages[-1]
    assert set(served) == set(expected)
    for key, value in served.items():
        if value.is_floating_point():
            assert value.float() == pytest.approx(expected[key], abs=1e-5), key
    predicted = mlflow.pyfunc.load_model(f"models:/tiny-sentiment/{version.version}").predict(pd.DataFrame({"text": TEXTS}))
    direct = TextClassifier(folder).predict(TEXTS)
    assert predicted[["prob_neg", "prob_pos"]].to_numpy() == pytest.approx(direct[["prob_neg", "prob_pos"]].to_numpy(), abs=1e-5)
