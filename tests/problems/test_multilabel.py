"""Multi-label classification as a problem type: sigmoid outputs judged at tuned thresholds, the
tuning itself (per label and global), what is saved with a model, the baseline, the per-label
figure and table, and the served table."""

import json

import numpy as np
import pytest
import torch
from scipy.special import expit, logit
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

from ftsearch.problems import PROBLEM_TYPES, problem_type
from ftsearch.problems.multilabel import MultiLabelClassification

MULTI = problem_type("multi-label-classification")
LABELS = ("sports", "politics", "weather")

# A validation split whose best thresholds are known. Label 0: positives at 0.7-0.9 plus one at
# 0.37, negatives at 0.22-0.33: only 0.35 keeps every positive and drops every negative (F1 1;
# 0.30 lets 0.33 in, 0.40 loses 0.37). Label 1: positives 0.62 / 0.65, negatives 0.1 / 0.52: 0.55
# and 0.60 both score F1 1, and the tie goes to the one nearer 0.5. Label 2: no positive at all.
VAL_PROBS = np.array([
    [0.70, 0.10, 0.10],
    [0.80, 0.52, 0.20],
    [0.90, 0.62, 0.30],
    [0.37, 0.65, 0.60],
    [0.22, 0.10, 0.40],
    [0.27, 0.10, 0.10],
    [0.33, 0.10, 0.10],
])
VAL_TRUE = np.array([
    [1, 0, 0],
    [1, 0, 0],
    [1, 1, 0],
    [1, 1, 0],
    [0, 0, 0],
    [0, 0, 0],
    [0, 0, 0],
], dtype=np.float32)
VAL_OUTPUTS = logit(VAL_PROBS).astype(np.float32)


def test_registered_with_sigmoid_head_and_binary_cross_entropy():
    assert PROBLEM_TYPES["multi-label-classification"] is MULTI
    assert MULTI.target_kind == "classes"
    assert list(MULTI.metrics) == ["f1_micro", "f1_macro", "average_precision"]
    assert {MULTI.direction(m) for m in MULTI.metrics} == {"maximize"}
    assert MULTI.head_size(LABELS) == 3
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]], dtype=torch.bfloat16)
    targets = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    loss = MULTI.loss(logits, targets)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets))


def test_per_label_tuning_picks_each_labels_best_threshold():
    tuned = MULTI.tuned(MULTI.evaluation(VAL_TRUE, VAL_OUTPUTS))
    assert tuned.thresholds.tolist() == [0.35, 0.55, 0.5]
    assert MULTI.thresholds is None  # the registered type is never changed


def test_global_tuning_picks_the_one_best_threshold_for_the_chosen_f1():
    two = (VAL_TRUE[:, :2], VAL_OUTPUTS[:, :2])
    # Micro F1 (pooled over labels 0 and 1): at 0.35 tp 6, fp 1 (0.52), fn 0 -> 12/13; at 0.55
    # tp 5, fp 0, fn 1 (0.37) -> 10/11; 0.40-0.50: 10/12; 0.30: 12/14. Best: 0.35.
    micro = MULTI.fitted(VAL_TRUE, thresholds="global", metric="f1_micro")
    assert micro.tuned(micro.evaluation(*two)).thresholds.tolist() == [0.35, 0.35]
    # Macro F1 (mean of the two labels'): at 0.35 (1 + 0.8) / 2 = 0.9; at 0.55 and 0.60
    # (6/7 + 1) / 2 = 0.929, the tie going to 0.55, the nearer to 0.5.
    macro = MULTI.fitted(VAL_TRUE, thresholds="global", metric="f1_macro")
    assert macro.tuned(macro.evaluation(*two)).thresholds.tolist() == [0.55, 0.55]
    # Any other metric (average precision) tunes for macro F1.
    other = MULTI.fitted(VAL_TRUE, thresholds="global", metric="average_precision")
    assert other.tuned(other.evaluation(*two)).thresholds.tolist() == [0.55, 0.55]


def test_fitted_rejects_an_unknown_threshold_mode():
    with pytest.raises(ValueError, match="per_label"):
        MULTI.fitted(VAL_TRUE, thresholds="per_class")


def test_metrics_are_scikit_learns_at_the_thresholds():
    tuned = MULTI.tuned(MULTI.evaluation(VAL_TRUE, VAL_OUTPUTS))
    rng = np.random.default_rng(0)
    y_true = (rng.random((40, 3)) < 0.4).astype(np.float32)
    y_true[:, 2] = 0  # a label without positives: left out of average precision
    outputs = rng.normal(size=(40, 3)).astype(np.float32)
    predicted = expit(outputs.astype(np.float64)) >= np.array([0.35, 0.55, 0.5])
    scores = tuned.score(y_true, outputs)
    assert scores == pytest.approx({
        "f1_micro": f1_score(y_true, predicted, average="micro", zero_division=0),
        "f1_macro": f1_score(y_true, predicted, average="macro", zero_division=0),
        "average_precision": average_precision_score(y_true[:, :2], expit(outputs[:, :2].astype(np.float64))),
    })
    assert all(isinstance(v, float) for v in scores.values())


def test_average_precision_is_zero_not_nan_without_any_positive():
    scores = MULTI.score(np.zeros((4, 3), dtype=np.float32), np.zeros((4, 3), dtype=np.float32))
    assert scores == {"f1_micro": 0.0, "f1_macro": 0.0, "average_precision": 0.0}


def test_untuned_score_tunes_on_the_outputs_it_judges():
    scores = MULTI.score(VAL_TRUE, VAL_OUTPUTS)
    predicted = VAL_PROBS >= np.array([0.35, 0.55, 0.5])
    assert scores["f1_micro"] == pytest.approx(f1_score(VAL_TRUE, predicted, average="micro", zero_division=0))
    # Labels 0 and 1 are perfect at their own thresholds; label 2 (no positive, so 0.5) has one
    # false positive, at 0.6: tp 6, fp 1.
    assert scores["f1_micro"] == pytest.approx(12 / 13)


def test_the_test_split_is_judged_with_the_validation_thresholds_restored_from_json():
    tuned = MULTI.tuned(MULTI.evaluation(VAL_TRUE, VAL_OUTPUTS))
    state = json.loads(json.dumps(tuned.state()))
    assert state == {"mode": "per_label", "metric": "f1_macro", "thresholds": [0.35, 0.55, 0.5]}
    restored = MULTI.restored(state)
    assert restored.thresholds.tolist() == [0.35, 0.55, 0.5] and restored.state() == state
    # On test, label 0's positives sit at 0.32: validation's 0.35 misses them, where tuning on
    # test itself would have caught them.
    test_true = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32)
    test_outputs = logit(np.array([[0.32, 0.7, 0.1], [0.32, 0.1, 0.1], [0.1, 0.1, 0.1]])).astype(np.float32)
    kept = restored.score(test_true, test_outputs)
    assert kept == tuned.score(test_true, test_outputs)
    predicted = np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert kept["f1_micro"] == pytest.approx(f1_score(test_true, predicted, average="micro", zero_division=0))
    assert kept["f1_micro"] == pytest.approx(0.5)
    assert MULTI.score(test_true, test_outputs)["f1_micro"] == 1.0


def test_state_before_tuning_has_no_thresholds_and_round_trips():
    fitted = MULTI.fitted(VAL_TRUE, thresholds="global", metric="f1_micro")
    state = json.loads(json.dumps(fitted.state()))
    assert state == {"mode": "global", "metric": "f1_micro"}
    restored = MULTI.restored(state)
    assert (restored.mode, restored.metric, restored.thresholds) == ("global", "f1_micro", None)
    assert MULTI.mode == "per_label"


def _toy(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    weights = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, -1, 0], [0, 0, 0], [0, 0, 0.5]])
    y = (x @ weights > np.array([0.0, 0.3, -0.2])).astype(np.float32)
    return x, y


def test_baseline_is_one_vs_rest_logistic_regression_scored_on_every_split_but_train():
    x, y = _toy(0)
    features = {"train": (x[:240], y[:240]), "val": (x[240:320], y[240:320]), "test": (x[320:], y[320:])}
    scores = MULTI.baseline(features, 1.0, 500)
    assert set(scores) == {f"baseline_{split}_{metric}" for split in ("val", "test") for metric in MULTI.metrics}
    assert scores["baseline_val_f1_micro"] > 0.8 and scores["baseline_test_f1_micro"] > 0.8
    assert scores["baseline_test_average_precision"] > 0.8


def test_baseline_scores_test_with_thresholds_tuned_on_validation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    x, y = _toy(1, 200)
    features = {"train": (x[:120], y[:120]), "val": (x[120:160], y[120:160]), "test": (x[160:], y[160:])}
    scores = MULTI.baseline(features, 0.5, 500)
    model = OneVsRestClassifier(LogisticRegression(C=0.5, max_iter=500)).fit(x[:120], y[:120])
    val_outputs, test_outputs = (logit(np.clip(model.predict_proba(x[a:b]), 1e-6, 1 - 1e-6)).astype(np.float32)
                                 for a, b in ((120, 160), (160, 200)))
    tuned = MULTI.tuned(MULTI.evaluation(y[120:160], val_outputs))
    assert scores["baseline_val_f1_macro"] == pytest.approx(MULTI.score(y[120:160], val_outputs)["f1_macro"])
    assert scores["baseline_test_f1_macro"] == pytest.approx(tuned.score(y[160:], test_outputs)["f1_macro"])


def test_baseline_survives_a_label_without_train_positives_and_sparse_features():
    import scipy.sparse

    x, y = _toy(2, 120)
    y[:80, 1] = 0  # label 1 never positive in train
    features = {"train": (scipy.sparse.csr_matrix(x[:80]), y[:80]), "test": (scipy.sparse.csr_matrix(x[80:]), y[80:])}
    scores = MULTI.baseline(features, 1.0, 500)  # no "val": tuned on test, the first split after train
    assert set(scores) == {f"baseline_test_{metric}" for metric in MULTI.metrics}
    assert not any(np.isnan(v) for v in scores.values())


def test_the_baseline_as_a_linear_head_gives_the_estimators_label_probabilities():
    x, y = _toy(2, 120)
    y[:, 1] = 0  # a label never positive: sklearn's constant predictor, weight 0
    estimator = MULTI.fit_baseline(x, y, 1.0, 500)
    weight, bias = MULTI.baseline_head(estimator, 3)
    assert weight.shape == (3, x.shape[1]) and not weight[1].any()
    head = x @ weight.T + bias
    assert expit(head) == pytest.approx(expit(MULTI.baseline_outputs(estimator, x, 3)), abs=1e-5)


def test_tables_give_each_labels_precision_recall_f1_support_and_threshold():
    rng = np.random.default_rng(3)
    y_true = (rng.random((30, 3)) < 0.5).astype(np.float32)
    outputs = rng.normal(size=(30, 3)).astype(np.float32)
    tuned = MULTI.tuned(MULTI.evaluation(VAL_TRUE, VAL_OUTPUTS))
    rows = tuned.tables(tuned.evaluation(y_true, outputs), LABELS)["per_label.json"]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, expit(outputs.astype(np.float64)) >= np.array([0.35, 0.55, 0.5]), average=None, zero_division=0)
    assert [row["label"] for row in rows] == list(LABELS)
    assert [row["threshold"] for row in rows] == [0.35, 0.55, 0.5]
    assert [row["support"] for row in rows] == y_true.sum(axis=0).astype(int).tolist() == support.tolist()
    assert [row["f1"] for row in rows] == pytest.approx(f1.tolist())
    assert [row["precision"] for row in rows] == pytest.approx(precision.tolist())
    assert [row["recall"] for row in rows] == pytest.approx(recall.tolist())
    json.dumps(rows)  # an artifact as is
    # Untuned, the table uses the thresholds score tunes on the same outputs.
    untuned = MULTI.tables(MULTI.evaluation(VAL_TRUE, VAL_OUTPUTS), LABELS)["per_label.json"]
    assert [row["threshold"] for row in untuned] == [0.35, 0.55, 0.5]
    assert [row["f1"] for row in untuned] == [1.0, 1.0, 0.0]


def test_figure_is_a_sorted_bar_per_label_named_with_its_threshold():
    import matplotlib.pyplot as plt

    figures = MULTI.figures(MULTI.evaluation(VAL_TRUE[:, :2], VAL_OUTPUTS[:, :2]), LABELS[:2])
    assert list(figures) == ["per_label_f1.png"]
    axes = figures["per_label_f1.png"].axes[0]
    assert [bar.get_width() for bar in axes.patches] == [1.0, 1.0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["sports (t=0.35)", "politics (t=0.55)"]
    plt.close(figures["per_label_f1.png"])


def test_no_mistakes_to_show():
    assert MULTI.mistakes(MULTI.evaluation(VAL_TRUE, VAL_OUTPUTS)) == []


def test_prediction_table_names_the_labels_at_their_thresholds():
    outputs = logit(np.array([[0.9, 0.6, 0.2], [0.4, 0.3, 0.45], [0.1, 0.2, 0.7]])).astype(np.float32)
    table = MULTI.prediction_table(outputs, LABELS)  # never tuned: 0.5 each
    assert list(table.columns) == ["labels", "prob_sports", "prob_politics", "prob_weather"]
    assert list(table.columns) == MULTI.output_schema(LABELS).input_names()
    assert table["labels"].tolist() == ["sports, politics", "", "weather"]
    assert table["prob_sports"].to_numpy() == pytest.approx([0.9, 0.4, 0.1], abs=1e-6)
    tuned = MULTI.restored({"mode": "per_label", "thresholds": [0.35, 0.65, 0.4]})
    assert tuned.prediction_table(outputs, LABELS)["labels"].tolist() == ["sports", "sports, weather", "weather"]


def test_an_unknown_mode_is_refused_everywhere():
    with pytest.raises(ValueError):
        MultiLabelClassification(mode="nope")
    with pytest.raises(ValueError):
        MULTI.restored({"mode": "nope"})


def test_the_head_starts_at_each_labels_prior_log_odds():
    targets = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=np.float32)
    assert MULTI.head_bias() is None  # unfitted: the model's own initialisation
    bias = MULTI.fitted(targets).head_bias()
    # Prevalences 0.75, 0.25 and 0 (clipped, so the log-odds stay finite).
    assert np.allclose(bias[:2], logit([0.75, 0.25]), atol=1e-6) and bias[2] == pytest.approx(logit(1e-4), rel=1e-4)


def test_label_issues_find_a_planted_missing_and_a_planted_wrong_label():
    rng = np.random.default_rng(1)
    y = (rng.random((240, 3)) < 0.4).astype(np.float32)
    x = rng.normal(scale=0.3, size=(240, 3)) + 3 * y  # each label has its own feature
    given = y.copy()
    given[10] = 1 - given[10]  # every label of row 10 flipped
    given[99, :] = 0
    given[99, np.argmin(y[99])] = 1  # row 99 given only a label it does not have
    found = MULTI.label_issues(x, given, LABELS, inverse_regularisation=1.0, max_iter=1000)
    assert {10, 99} <= {row["index"] for row in found.rows} and found.found <= 6
    row = next(row for row in found.rows if row["index"] == 10)
    names = lambda labels: ", ".join(LABELS[j] for j in np.flatnonzero(labels)) or "(none)"
    assert (row["given"], row["suggested"]) == (names(given[10]), names(y[10]))
    # A label nobody has, or everybody has, cannot be checked by confident learning.
    assert MULTI.label_issues(x, np.column_stack([given[:, :2], np.zeros(240)]), LABELS, 1.0, 1000) is None
    assert MULTI.label_issues(x, np.column_stack([given[:, :2], np.ones(240)]), LABELS, 1.0, 1000) is None
