"""Regression as a problem type: a standardised single output and its MSE loss, predictions back
in target units, correlation and error metrics, what is saved with a model, the baseline, the
scatter figure and the served table."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error

from ftsearch.problems import PROBLEM_TYPES, problem_type

REGRESSION = problem_type("regression")
# Mean 3, (population) standard deviation 2.
TRAIN_TARGETS = np.array([1.0, 5.0, 1.0, 5.0], dtype=np.float32)


def test_registered_with_one_output_and_the_direction_of_each_metric():
    assert PROBLEM_TYPES["regression"] is REGRESSION
    assert REGRESSION.target_kind == "number"
    assert REGRESSION.head_size(("anything",)) == 1
    assert list(REGRESSION.metrics) == ["pearson", "spearman", "rmse", "mae"]
    assert {m: REGRESSION.direction(m) for m in REGRESSION.metrics} == {
        "pearson": "maximize", "spearman": "maximize", "rmse": "minimize", "mae": "minimize"}
    assert REGRESSION.better("rmse", 0.5, 0.6) and not REGRESSION.better("mae", 0.6, 0.5)


def test_loss_is_mse_on_the_standardised_targets():
    fitted = REGRESSION.fitted(TRAIN_TARGETS)
    assert (fitted.mean, fitted.std) == (3.0, 2.0)
    assert (REGRESSION.mean, REGRESSION.std) == (0.0, 1.0)  # the registered type is never changed
    outputs = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.bfloat16)
    targets = torch.tensor([4.0, 1.0, 3.0])
    loss = fitted.loss(outputs, targets)
    assert loss.dtype == torch.float32
    expected = torch.nn.functional.mse_loss(outputs.float().squeeze(-1), (targets - 3.0) / 2.0)
    assert torch.allclose(loss, expected)
    assert loss.item() == pytest.approx(((0.5 - 0.5) ** 2 + (-1 + 1) ** 2 + (2 - 0) ** 2) / 3, rel=1e-2)
    # A batch of one keeps its shape: (1, 1) outputs against (1,) targets.
    assert fitted.loss(torch.tensor([[1.0]]), torch.tensor([3.0])).item() == pytest.approx(1.0)


def test_predictions_map_back_to_target_units_and_clip_to_the_range():
    fitted = REGRESSION.fitted(TRAIN_TARGETS)
    assert fitted.predictions(np.array([[0.0], [1.0], [-1.5]], dtype=np.float32)).tolist() == [3.0, 5.0, 0.0]
    clipped = REGRESSION.fitted(TRAIN_TARGETS, target_range=(1, 4), unrelated_option=True)
    assert clipped.predictions(np.array([[0.0], [1.0], [-1.5]], dtype=np.float32)).tolist() == [3.0, 4.0, 1.0]
    # Unfitted: the output is the prediction.
    assert REGRESSION.predictions(np.array([[0.25], [-2.0]])).tolist() == [0.25, -2.0]


def test_constant_train_targets_do_not_divide_by_zero():
    fitted = REGRESSION.fitted(np.full(5, 7.0, dtype=np.float32))
    assert (fitted.mean, fitted.std) == (7.0, 1.0)


def test_metrics_are_scipys_and_scikit_learns_on_the_predictions():
    fitted = REGRESSION.fitted(TRAIN_TARGETS)
    y_true = np.array([1.0, 2.0, 4.0, 3.5, 6.0, 2.5], dtype=np.float32)
    outputs = np.array([[-0.8], [-0.2], [0.4], [0.6], [1.1], [-0.6]], dtype=np.float32)
    predicted = outputs[:, 0].astype(np.float64) * 2 + 3
    scores = fitted.score(y_true, outputs)
    assert scores == pytest.approx({
        "pearson": pearsonr(y_true, predicted)[0],
        "spearman": spearmanr(y_true, predicted)[0],
        "rmse": math.sqrt(mean_squared_error(y_true, predicted)),
        "mae": mean_absolute_error(y_true, predicted),
    })
    assert 0 < scores["spearman"] < 1 and scores["pearson"] != pytest.approx(scores["spearman"])
    assert all(isinstance(v, float) for v in scores.values())


def test_constant_predictions_or_targets_give_correlation_zero_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning from scipy either
        flat = REGRESSION.score(np.array([1.0, 2.0, 3.0]), np.zeros((3, 1), dtype=np.float32))
        same = REGRESSION.score(np.array([2.0, 2.0, 2.0]), np.array([[1.0], [2.0], [3.0]], dtype=np.float32))
    assert (flat["pearson"], flat["spearman"]) == (0.0, 0.0)
    assert (same["pearson"], same["spearman"]) == (0.0, 0.0)
    assert flat["mae"] == pytest.approx(2.0)
    assert not any(math.isnan(v) for v in [*flat.values(), *same.values()])


def test_state_round_trips_through_json():
    fitted = REGRESSION.fitted(TRAIN_TARGETS, target_range=(0, 10))
    state = json.loads(json.dumps(fitted.state()))
    assert state == {"mean": 3.0, "std": 2.0, "target_range": [0.0, 10.0]}
    restored = REGRESSION.restored(state)
    assert restored.predictions(np.array([[1.0], [9.0]])).tolist() == [5.0, 10.0]
    assert restored.state() == state
    assert json.loads(json.dumps(REGRESSION.state())) == {"mean": 0.0, "std": 1.0, "target_range": None}


def test_target_range_must_be_low_then_high():
    with pytest.raises(ValueError, match="low <= high"):
        REGRESSION.fitted(TRAIN_TARGETS, target_range=(5, 1))


def _linear(seed: int, n: int = 150):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (10 + 3 * x[:, 0] - 2 * x[:, 1] + 0.3 * rng.normal(size=n)).astype(np.float32)
    return x, y


def test_baseline_is_ridge_and_scores_every_split_but_train():
    x, y = _linear(0)
    features = {"train": (x[:100], y[:100]), "val": (x[100:125], y[100:125]), "test": (x[125:], y[125:])}
    for problem in (REGRESSION, REGRESSION.fitted(y[:100])):
        scores = problem.baseline(features, 1.0, 100)
        assert set(scores) == {f"baseline_{s}_{m}" for s in ("val", "test") for m in REGRESSION.metrics}
        assert scores["baseline_val_pearson"] > 0.9 and scores["baseline_test_pearson"] > 0.9
        assert scores["baseline_test_rmse"] < 1.0  # in target units: the noise is 0.3, the spread 3.6


def test_baseline_is_the_ridge_fit_in_standardised_space():
    from sklearn.linear_model import Ridge

    x, y = _linear(1, 60)
    fitted = REGRESSION.fitted(y[:40])
    scores = fitted.baseline({"train": (x[:40], y[:40]), "test": (x[40:], y[40:])}, 0.5, 100)
    ridge = Ridge(alpha=2.0).fit(x[:40], (y[:40] - fitted.mean) / fitted.std)
    predicted = ridge.predict(x[40:]) * fitted.std + fitted.mean
    assert scores["baseline_test_mae"] == pytest.approx(mean_absolute_error(y[40:], predicted), rel=1e-5)


def test_the_baseline_as_a_linear_head_gives_the_ridges_standardised_predictions():
    x, y = _linear(1, 60)
    fitted = REGRESSION.fitted(y)
    estimator = fitted.fit_baseline(x, y, 0.5, 100)
    weight, bias = fitted.baseline_head(estimator, 1)
    assert x @ weight.T + bias == pytest.approx(fitted.baseline_outputs(estimator, x, 1), abs=1e-5)


def test_figure_is_a_scatter_with_the_correlations_in_its_title():
    import matplotlib.pyplot as plt

    evaluation = REGRESSION.evaluation(np.array([1.0, 2.0, 3.0, 4.0]), np.array([[1.2], [1.9], [3.3], [3.8]]))
    figures = REGRESSION.figures(evaluation, ())
    assert list(figures) == ["scatter.png"]
    axes = figures["scatter.png"].axes[0]
    assert axes.get_title().startswith(f"Pearson r = {evaluation.metrics['pearson']:.3f}, Spearman")
    assert len(axes.collections[0].get_offsets()) == 4
    plt.close(figures["scatter.png"])


def test_no_mistakes_and_no_tables():
    evaluation = REGRESSION.evaluation(np.array([1.0, 2.0]), np.array([[1.0], [2.0]]))
    assert REGRESSION.mistakes(evaluation) == []
    assert REGRESSION.tables(evaluation, ()) == {}


def test_prediction_table_and_its_schema_name_the_same_column():
    table = REGRESSION.fitted(TRAIN_TARGETS).prediction_table(np.array([[0.0], [1.0]], dtype=np.float32), ())
    assert list(table.columns) == ["prediction"] == REGRESSION.output_schema(()).input_names()
    assert table["prediction"].dtype == np.float64
    assert table["prediction"].tolist() == [3.0, 5.0]


def test_label_issues_are_the_targets_far_from_the_out_of_fold_prediction():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(scale=0.1, size=200)
    y[[3, 150]] += [8.0, -6.0]  # two mistyped targets
    found = REGRESSION.label_issues(x, y, (), inverse_regularisation=1.0, max_iter=0)
    assert [row["index"] for row in found.rows] == [3, 150] and found.found == 2 and found.checked == 200
    assert float(found.rows[0]["given"]) == pytest.approx(y[3], rel=1e-3)
    assert float(found.rows[0]["suggested"]) == pytest.approx(y[3] - 8.0, abs=0.5)
