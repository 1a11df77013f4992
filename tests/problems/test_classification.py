"""Single-label classification as a problem type: its head, loss, metrics, baseline, figures and
served outputs, and its place in the registry that drives `task:` and `metric:`."""

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from ftsearch.catalog import TASKS
from ftsearch.problems import PROBLEM_TYPES, problem_type

CLASSIFICATION = problem_type("single-label-classification")
LABELS = ("neg", "neutral", "pos")


def test_every_task_names_a_registered_problem_type():
    assert {spec.problem for spec in TASKS.values()} <= set(PROBLEM_TYPES)
    assert {spec.modality for spec in TASKS.values()} == {"text", "image"}


def test_metrics_are_scikit_learns_on_the_argmax_and_all_higher_is_better():
    y_true = np.array([0, 1, 2, 2, 1, 0])
    outputs = np.array([[2, 0, 0], [0, 1, 0], [0, 0, 3], [0, 4, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    predicted = outputs.argmax(axis=1)
    scores = CLASSIFICATION.score(y_true, outputs)
    # Three classes: no ROC AUC (it is binary here).
    assert scores == {"accuracy": accuracy_score(y_true, predicted), "f1": f1_score(y_true, predicted, average="macro"),
                      "mcc": matthews_corrcoef(y_true, predicted)}
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert {m: CLASSIFICATION.direction(m) for m in CLASSIFICATION.metrics} == {
        "accuracy": "maximize", "f1": "maximize", "mcc": "maximize", "roc_auc": "maximize"}
    assert CLASSIFICATION.better("accuracy", 0.9, 0.8) and not CLASSIFICATION.better("f1", 0.8, 0.8)
    assert CLASSIFICATION.mistakes(CLASSIFICATION.evaluation(y_true, outputs)) == [(3, 2, 1), (5, 0, 2)]


def test_loss_is_cross_entropy_for_class_ids_and_for_mixed_soft_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    ids = torch.tensor([0, 2])
    assert torch.allclose(CLASSIFICATION.loss(logits, ids), torch.nn.functional.cross_entropy(logits, ids))
    soft = torch.nn.functional.one_hot(ids, 3).float()
    assert torch.allclose(CLASSIFICATION.loss(logits, soft), CLASSIFICATION.loss(logits, ids))
    assert CLASSIFICATION.head_size(LABELS) == 3


def test_prediction_table_and_its_schema_name_the_same_columns():
    table = CLASSIFICATION.prediction_table(np.array([[0.0, 0.0, 5.0], [3.0, 0.0, 0.0]], dtype=np.float32), LABELS)
    assert list(table.columns) == ["label", "prob_neg", "prob_neutral", "prob_pos"]
    assert table["label"].tolist() == ["pos", "neg"]
    assert np.allclose(table[["prob_neg", "prob_neutral", "prob_pos"]].sum(axis=1), 1.0)
    assert CLASSIFICATION.output_schema(LABELS).input_names() == list(table.columns)


def test_baseline_scores_every_metric_on_every_split_but_train():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] > 0).astype(int)
    scores = CLASSIFICATION.baseline({"train": (x[:40], y[:40]), "val": (x[40:], y[40:])}, 1.0, 500)
    assert set(scores) == {"baseline_val_accuracy", "baseline_val_f1", "baseline_val_mcc", "baseline_val_roc_auc"}
    assert scores["baseline_val_accuracy"] >= 0.8
    assert scores["baseline_val_roc_auc"] >= 0.9


def test_baseline_scores_are_the_problem_types_own_on_the_estimators_log_probabilities():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 3))
    y = np.digitize(x[:, 0] + 0.5 * rng.normal(size=90), [-0.5, 0.5])  # three classes
    scores = CLASSIFICATION.baseline({"train": (x[:60], y[:60]), "test": (x[60:], y[60:])}, 1.0, 500)
    model = LogisticRegression(C=1.0, max_iter=500).fit(x[:60], y[:60])
    predicted = model.predict(x[60:])
    assert scores == {"baseline_test_accuracy": accuracy_score(y[60:], predicted),
                      "baseline_test_f1": f1_score(y[60:], predicted, average="macro"),
                      "baseline_test_mcc": matthews_corrcoef(y[60:], predicted)}


def test_baseline_keeps_class_ids_when_a_class_is_missing_from_train():
    x = np.array([[-2.0], [-1.5], [-1.0], [1.0], [1.5], [2.0], [0.0]])
    y = np.array([0, 0, 0, 2, 2, 2, 1])
    scores = CLASSIFICATION.baseline({"train": (x[:6], y[:6]), "val": (x, y)}, 1.0, 500)
    # Class 1 is never predicted (no train example); the six others are right, as class ids 0 and 2.
    assert scores["baseline_val_accuracy"] == pytest.approx(6 / 7)


@pytest.mark.parametrize("classes", [[0, 1], [0, 1, 2], [0, 2]])  # binary, three, one missing from train
def test_the_baseline_as_a_linear_head_gives_the_estimators_probabilities(classes):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 4))
    y = np.array(classes)[np.digitize(x[:, 0] + 0.3 * rng.normal(size=80), np.linspace(-0.6, 0.6, len(classes) - 1))]
    estimator = CLASSIFICATION.fit_baseline(x, y, 1.0, 500)
    weight, bias = CLASSIFICATION.baseline_head(estimator, 3 if 2 in classes else 2)
    head = (x @ weight.T + bias).astype(np.float32)
    expected = CLASSIFICATION.baseline_outputs(estimator, x, weight.shape[0])
    assert softmax(head, axis=1) == pytest.approx(softmax(expected, axis=1), abs=1e-5)
    assert (head.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_binary_metrics_include_mcc_and_roc_auc_of_the_class_1_probability():
    y_true = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    outputs = np.array([[2, 0], [1, 0.5], [0, 1], [0.2, 0.1], [-1, 2], [0, 0.3], [0, 3], [1, 1.5]], dtype=np.float32)
    predicted = outputs.argmax(axis=1)
    scores = CLASSIFICATION.score(y_true, outputs)
    assert scores["mcc"] == pytest.approx(matthews_corrcoef(y_true, predicted))
    assert scores["roc_auc"] == pytest.approx(roc_auc_score(y_true, softmax(outputs, axis=1)[:, 1]))
    assert 0 < scores["roc_auc"] < 1 and scores["roc_auc"] != pytest.approx(scores["accuracy"])


def test_roc_auc_is_chance_not_nan_with_one_class_only():
    scores = CLASSIFICATION.score(np.array([1, 1, 1]), np.array([[0, 1], [1, 0], [0, 2]], dtype=np.float32))
    assert scores["roc_auc"] == 0.5
    assert scores["mcc"] == 0.0  # sklearn's own value where MCC is undefined
    assert not any(np.isnan(v) for v in scores.values())


def test_roc_auc_is_offered_only_for_two_classes():
    assert CLASSIFICATION.metrics_for(2) == ["accuracy", "f1", "mcc", "roc_auc"]
    assert CLASSIFICATION.metrics_for(3) == ["accuracy", "f1", "mcc"]
    assert CLASSIFICATION.metrics_for(None) == list(CLASSIFICATION.metrics)
    assert next(iter(CLASSIFICATION.metrics)) == "accuracy"  # the default metric is unchanged


def test_figures_are_a_confusion_matrix_over_every_class():
    import matplotlib.pyplot as plt

    evaluation = CLASSIFICATION.evaluation(np.array([0, 1]), np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    figures = CLASSIFICATION.figures(evaluation, LABELS)
    assert list(figures) == ["confusion_matrix.png"]
    axes = figures["confusion_matrix.png"].axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == list(LABELS)
    plt.close(figures["confusion_matrix.png"])


def test_label_issues_find_the_planted_flips_by_out_of_fold_confident_learning():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 60)
    x = rng.normal(size=(180, 4)) + 4 * np.eye(3, 4)[y]  # three well separated clusters
    flipped = [5, 70, 130, 150]
    given = y.copy()
    given[flipped] = (y[flipped] + 1) % 3
    found = CLASSIFICATION.label_issues(x, given, LABELS, inverse_regularisation=1.0, max_iter=1000)
    assert found.checked == 180 and found.found == len(found.rows)
    assert found.agreement == pytest.approx(176 / 180, abs=0.02)  # right where the given label is
    assert {row["index"] for row in found.rows} == set(flipped)
    row = next(row for row in found.rows if row["index"] == 70)
    assert (row["given"], row["suggested"]) == ("pos", "neutral") and 0 <= row["quality"] < 0.5
    assert [r["quality"] for r in found.rows] == sorted(r["quality"] for r in found.rows)  # worst first
    # Too few rows to hold out folds, or a single class: nothing to say.
    assert CLASSIFICATION.label_issues(x[:6], given[:6], LABELS, 1.0, 1000) is None
    assert CLASSIFICATION.label_issues(x, np.zeros(180, dtype=np.int64), LABELS, 1.0, 1000) is None


def test_label_issues_skip_a_class_of_one_row_that_a_fold_could_not_learn():
    x = np.random.default_rng(0).normal(size=(20, 3))
    assert CLASSIFICATION.label_issues(x, np.array([0] * 19 + [1]), LABELS[:2], 1.0, 100) is None
    assert CLASSIFICATION.label_issues(x, np.array([0] * 18 + [1] * 2), LABELS[:2], 1.0, 100) is not None
