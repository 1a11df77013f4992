"""Regression: one number per example. The head predicts the standardised target (MSE loss);
judged by Pearson and Spearman correlation, RMSE and MAE of the predictions in target units."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ftsearch.problems.base import LABEL_FOLDS, LABEL_ISSUES_LISTED, Evaluation, LabelIssues, ProblemType, out_of_fold

if TYPE_CHECKING:
    import pandas as pd
    import torch

OUTLIER_Z = 3.5  # a modified z-score above it marks an outlier (Iglewicz and Hoaglin)


class Regression(ProblemType):
    """Each example's target is a float32 number. The model's single output is the target
    standardised with the train targets' mean and standard deviation (so that the loss's scale,
    and hence the learning rate, does not depend on the target's units); ``predictions`` maps it
    back and clips it to ``target_range`` when one is given (a rating scale's ends, say)."""

    name = "regression"
    metrics: ClassVar[dict[str, bool]] = {"pearson": True, "spearman": True, "rmse": False, "mae": False}
    target_kind = "number"

    def __init__(self, mean: float = 0.0, std: float = 1.0, target_range: tuple[float, float] | None = None) -> None:
        self.mean = float(mean)
        self.std = float(std)
        self.target_range = _range(target_range)
        # Whether mean / std are the train targets' (fitted or restored), not the defaults.
        self._fitted = False

    def fitted(self, train_targets: np.ndarray, target_range: tuple[float, float] | None = None,
               **ignored: Any) -> Regression:
        """A copy standardising targets with ``train_targets``' mean and standard deviation (1.0
        where they are constant, which would divide by zero), clipping predictions to the
        optional ``(low, high)`` ``target_range``."""
        targets = np.asarray(train_targets, dtype=np.float64).ravel()
        mean = float(targets.mean()) if targets.size else 0.0
        std = float(targets.std()) if targets.size else 0.0
        return self._with(mean=mean, std=std if std > 0 and math.isfinite(std) else 1.0,
                          target_range=_range(target_range), _fitted=True)

    def state(self) -> dict[str, Any]:
        """``mean``, ``std`` and ``target_range`` (``[low, high]`` or ``None``)."""
        return {"mean": self.mean, "std": self.std,
                "target_range": None if self.target_range is None else list(self.target_range)}

    def restored(self, state: dict[str, Any]) -> Regression:
        """A copy with a saved ``state``."""
        return self._with(mean=float(state.get("mean", 0.0)), std=float(state.get("std", 1.0)),
                          target_range=_range(state.get("target_range")), _fitted=True)

    def _with(self, **attributes: Any) -> Regression:
        """A copy with ``attributes`` set: the registered instance is shared, so never mutated."""
        other = copy.copy(self)
        for name, value in attributes.items():
            setattr(other, name, value)
        return other

    def head_size(self, labels: tuple[str, ...]) -> int:
        """One output: the standardised target."""
        return 1

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean squared error between the output and the standardised target."""
        import torch.nn.functional as F

        predicted = outputs.float().squeeze(-1)
        # In float32 even under bf16 autocast; reshaped so that (batch, 1) targets cannot broadcast
        # against (batch,) outputs into a (batch, batch) difference.
        standardised = ((targets.float() - self.mean) / self.std).reshape(predicted.shape)
        return F.mse_loss(predicted, standardised)

    def predictions(self, outputs: np.ndarray) -> np.ndarray:
        """The predicted targets, in target units (float64, one per row of ``outputs``), clipped to
        ``target_range`` when set."""
        outputs = np.asarray(outputs, dtype=np.float64)
        column = outputs[:, 0] if outputs.ndim == 2 else outputs.ravel()
        predicted = column * self.std + self.mean
        if self.target_range is not None:
            predicted = np.clip(predicted, *self.target_range)
        return predicted

    def score(self, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        """Pearson and Spearman correlation, RMSE and MAE of ``predictions(outputs)`` against
        ``y_true``, with scipy / scikit-learn."""
        from scipy.stats import pearsonr, spearmanr
        from sklearn import metrics

        y_true = np.asarray(y_true, dtype=np.float64).ravel()
        predicted = self.predictions(outputs)
        if hasattr(metrics, "root_mean_squared_error"):
            rmse = float(metrics.root_mean_squared_error(y_true, predicted))
        else:  # scikit-learn < 1.4
            rmse = math.sqrt(metrics.mean_squared_error(y_true, predicted))
        return {
            "pearson": _correlation(pearsonr, y_true, predicted),
            "spearman": _correlation(spearmanr, y_true, predicted),
            "rmse": rmse,
            "mae": float(metrics.mean_absolute_error(y_true, predicted)),
        }

    def combine(self, outputs: list[np.ndarray], weights: list[float]) -> np.ndarray:
        """The weighted mean of the members' (standardised) predictions."""
        return sum(w * np.asarray(o, dtype=np.float32).reshape(-1, 1) for w, o in zip(weights, outputs, strict=True))

    def fit_baseline(self, x, y: np.ndarray, inverse_regularisation: float, max_iter: int):
        """Ridge regression (``alpha = 1 / inverse_regularisation``) of the targets standardised
        as the model's are (an unfitted type standardises by ``y`` itself). ``max_iter`` is
        unused: Ridge's default solvers are direct."""
        y = np.asarray(y, dtype=np.float64).ravel()
        scaling = self._scaling(y)
        return _estimator(inverse_regularisation).fit(x, (y - scaling.mean) / scaling.std)

    def baseline_outputs(self, estimator, x, n_outputs: int) -> np.ndarray:
        """The ridge's standardised predictions, as the model's head gives them."""
        return np.asarray(estimator.predict(x), dtype=np.float32).reshape(-1, 1)

    def baseline_head(self, estimator, n_outputs: int) -> tuple[np.ndarray, np.ndarray]:
        """The ridge's coefficients and intercept: its standardised prediction."""
        weight = np.asarray(estimator.coef_, dtype=np.float32).reshape(1, -1)
        return weight, np.atleast_1d(np.asarray(estimator.intercept_, dtype=np.float32))

    def _scaling(self, train_targets: np.ndarray) -> Regression:
        return self if self._fitted else self.fitted(train_targets, target_range=self.target_range)

    def baseline(self, features: dict[str, tuple], inverse_regularisation: float, max_iter: int) -> dict[str, float]:
        """Ridge regression (``fit_baseline``) scored like the model on every other split."""
        features = dict(features)
        x_train, y_train = features.pop("train")
        model = self.fit_baseline(x_train, y_train, inverse_regularisation, max_iter)
        scaling = self._scaling(np.asarray(y_train, dtype=np.float64).ravel())
        scores = {}
        for split, (x, y) in features.items():
            for metric, value in scaling.score(np.asarray(y), self.baseline_outputs(model, x, 1)).items():
                scores[f"baseline_{split}_{metric}"] = value
        return scores

    def label_issues(self, x, y: np.ndarray, labels: tuple[str, ...], inverse_regularisation: float,
                     max_iter: int) -> LabelIssues | None:
        """Targets far from the ridge regression's out-of-fold prediction: a modified z-score of
        the residual over 3.5 (Iglewicz and Hoaglin's outlier rule, robust to the outliers it
        looks for); ranked by cleanlab's residual label quality. Confident learning needs classes."""
        from cleanlab.regression.rank import get_label_quality_scores

        y = np.asarray(y, dtype=np.float64).ravel()
        if len(y) < 2 * LABEL_FOLDS:
            return None
        predicted = out_of_fold(_estimator(inverse_regularisation), x, y, "predict", stratified=False)
        residual = y - predicted
        deviation = np.abs(residual - np.median(residual))
        z = 0.6745 * deviation / max(float(np.median(deviation)), 1e-12)
        quality = get_label_quality_scores(y, predicted, method="residual")
        found = [i for i in np.argsort(quality, kind="stable") if z[i] > OUTLIER_Z]
        rows = [{"index": int(i), "given": f"{y[i]:.4g}", "suggested": f"{predicted[i]:.4g}",
                 "quality": round(float(quality[i]), 4)} for i in found[:LABEL_ISSUES_LISTED]]
        return LabelIssues(f"residual outliers (modified z > {OUTLIER_Z}), {LABEL_FOLDS}-fold ridge regression",
                           len(y), len(found), rows)

    def figures(self, evaluation: Evaluation, labels: tuple[str, ...]) -> dict[str, object]:
        """``scatter.png``: predicted against true targets, with the line y = x."""
        import matplotlib.pyplot as plt

        y_true = np.asarray(evaluation.y_true, dtype=np.float64).ravel()
        predicted = self.predictions(evaluation.outputs)
        scores = evaluation.metrics if {"pearson", "spearman"} <= set(evaluation.metrics) \
            else self.score(y_true, evaluation.outputs)
        figure, axes = plt.subplots(figsize=(5, 5))
        try:
            axes.scatter(y_true, predicted, s=8, alpha=0.5)
            both = np.concatenate([y_true, predicted])
            low, high = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
            axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="y = x")
            axes.set_xlabel("true")
            axes.set_ylabel("predicted")
            axes.legend(loc="upper left")
            axes.set_title(f"Pearson r = {scores['pearson']:.3f}, Spearman rho = {scores['spearman']:.3f}")
            figure.tight_layout()
        except Exception:
            plt.close(figure)
            raise
        return {"scatter.png": figure}

    def mistakes(self, evaluation: Evaluation) -> list[tuple[int, int, int]]:
        """None: a number is not right or wrong, only near or far (see the scatter figure)."""
        return []

    def prediction_table(self, outputs: np.ndarray, labels: tuple[str, ...]) -> pd.DataFrame:
        """``prediction``: the predicted target, in target units."""
        import pandas as pd

        return pd.DataFrame({"prediction": self.predictions(outputs).astype(np.float64)})

    def output_schema(self, labels: tuple[str, ...]):
        """One double column, ``prediction``."""
        from mlflow.types import ColSpec, Schema

        return Schema([ColSpec("double", "prediction")])


def _range(target_range) -> tuple[float, float] | None:
    """``(low, high)`` as floats, or ``None``."""
    if target_range is None:
        return None
    low, high = (float(v) for v in target_range)
    if low > high:
        raise ValueError(f"target_range must be (low, high) with low <= high, not {target_range!r}")
    return low, high


def _correlation(correlate, y_true: np.ndarray, predicted: np.ndarray) -> float:
    """``correlate``'s (scipy's pearsonr / spearmanr) coefficient; 0.0 where it is undefined."""
    # Undefined with constant predictions (an untrained or collapsed head) or constant targets (no
    # variance to explain), and with fewer than two examples: scipy warns and returns NaN (or
    # raises), and a NaN fails the Optuna trial. 0.0 is "no linear / monotonic relation".
    if len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(predicted) == 0:
        return 0.0
    value = float(correlate(y_true, predicted)[0])
    return value if math.isfinite(value) else 0.0


def _estimator(inverse_regularisation: float):
    from sklearn.linear_model import Ridge

    return Ridge(alpha=1.0 / inverse_regularisation)
