"""Single-label classification as a problem type: its head, loss, metrics, baseline, figures and
served outputs, and its place in the registry that drives `task:` and `metric:`."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

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
    assert scores == {"accuracy": accuracy_score(y_true, predicted), "f1": f1_score(y_true, predicted, average="macro")}
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert {m: CLASSIFICATION.direction(m) for m in scores} == {"accuracy": "maximize", "f1": "maximize"}
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
    assert set(scores) == {"baseline_val_accuracy", "baseline_val_f1"}
    assert scores["baseline_val_accuracy"] >= 0.8


def test_figures_are_a_confusion_matrix_over_every_class():
    import matplotlib.pyplot as plt

    evaluation = CLASSIFICATION.evaluation(np.array([0, 1]), np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    figures = CLASSIFICATION.figures(evaluation, LABELS)
    assert list(figures) == ["confusion_matrix.png"]
    axes = figures["confusion_matrix.png"].axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == list(LABELS)
    plt.close(figures["confusion_matrix.png"])
