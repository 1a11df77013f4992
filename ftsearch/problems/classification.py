"""Single-label classification: one softmax over the classes, cross-entropy; accuracy, macro F1,
Matthews correlation and (with two classes) ROC AUC."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ftsearch.problems.base import LABEL_FOLDS, LABEL_ISSUES_LISTED, Evaluation, LabelIssues, ProblemType, out_of_fold

if TYPE_CHECKING:
    import pandas as pd
    import torch

# The logit of a class a linear probe never saw: far enough below every other that its softmax
# probability is 0 in float32, finite so that the served layer stays ordinary arithmetic.
MISSING_CLASS_LOGIT = -1.0e4


class SingleLabelClassification(ProblemType):
    """Each example has exactly one of ``labels``; targets are class ids (or, mixed by MixUp /
    CutMix, class probabilities)."""

    name = "single-label-classification"
    metrics: ClassVar[dict[str, bool]] = {
        "accuracy": True,
        "f1": True,  # macro-averaged over classes
        "mcc": True,  # Matthews correlation coefficient (multi-class generalisation with > 2 classes)
        "roc_auc": True,  # binary problems only: ranks by the softmax probability of class 1
    }

    def metrics_for(self, n_labels: int | None) -> list[str]:
        """Every metric, less ``roc_auc`` unless there are exactly two classes (``None``: unknown
        yet, so all of them)."""
        return [m for m in self.metrics if m != "roc_auc" or n_labels in (None, 2)]

    def head_size(self, labels: tuple[str, ...]) -> int:
        """One logit per class."""
        return len(labels)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class ids or (mixed batches) class probabilities."""
        import torch.nn.functional as F

        # In float32 even under bf16 autocast; soft targets (mixed batches) are class probabilities.
        return F.cross_entropy(outputs.float(), targets)

    def score(self, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        """accuracy, macro F1 and MCC of the argmax; ROC AUC too when ``outputs`` has two columns."""
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

        y_true = np.asarray(y_true)
        outputs = np.asarray(outputs)
        y_pred = outputs.argmax(axis=-1)
        scores = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "f1": float(f1_score(y_true, y_pred, average="macro")),
            # sklearn returns 0.0 itself where MCC is undefined (constant predictions or targets).
            "mcc": float(matthews_corrcoef(y_true, y_pred)),
        }
        if outputs.ndim == 2 and outputs.shape[1] == 2:
            if len(np.unique(y_true)) < 2:
                # ROC AUC is undefined with one class only (no pairs to rank); 0.5 is chance, and
                # sklearn would raise, failing the trial.
                scores["roc_auc"] = 0.5
            else:
                scores["roc_auc"] = float(roc_auc_score(y_true, _softmax(outputs)[:, 1]))
        return scores

    def combine(self, outputs: list[np.ndarray], weights: list[float]) -> np.ndarray:
        """The log of the weighted mean of the members' class probabilities."""
        mean = sum(w * _softmax(o) for w, o in zip(weights, outputs, strict=True))
        with np.errstate(divide="ignore"):  # a class no member gives any probability: log 0
            return np.log(mean).astype(np.float32)

    def fit_baseline(self, x, y: np.ndarray, inverse_regularisation: float, max_iter: int):
        """Logistic regression."""
        return _estimator(inverse_regularisation, max_iter).fit(x, np.asarray(y))

    def baseline_outputs(self, estimator, x, n_outputs: int) -> np.ndarray:
        """Log-probabilities stand in for the logits (same argmax, and their softmax is the
        probabilities). A class missing from train has no column in ``predict_log_proba``; it gets
        one of log-probability -inf, so that columns are class ids."""
        classes = np.asarray(estimator.classes_).astype(int)
        outputs = np.full((x.shape[0], max(n_outputs, int(classes.max()) + 1)), -np.inf, dtype=np.float32)
        outputs[:, classes] = estimator.predict_log_proba(x)
        return outputs

    def baseline_head(self, estimator, n_outputs: int) -> tuple[np.ndarray, np.ndarray]:
        """The logistic regression's decision function as logits: their softmax is its
        probabilities (binary: logits 0 and ``w.x + b``). A class missing from train gets weight 0
        and a bias no other class's logit comes near, probability 0 as in ``baseline_outputs``."""
        classes = np.asarray(estimator.classes_).astype(int)
        coef, intercept = np.atleast_2d(estimator.coef_), np.atleast_1d(estimator.intercept_)
        if len(classes) == 2:
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        weight = np.zeros((n_outputs, coef.shape[1]), dtype=np.float32)
        bias = np.full(n_outputs, MISSING_CLASS_LOGIT, dtype=np.float32)
        weight[classes], bias[classes] = coef, intercept
        return weight, bias

    def baseline(self, features: dict[str, tuple], inverse_regularisation: float, max_iter: int) -> dict[str, float]:
        """Logistic regression on the train features, scored like the model on every other split
        (``baseline_outputs``), so every metric, ROC AUC included, is the model's."""
        features = dict(features)
        model = self.fit_baseline(*features.pop("train"), inverse_regularisation, max_iter)
        # Every class seen anywhere gets a column, as in the model's head.
        n_classes = max([0, *(int(np.max(y)) + 1 for _, y in features.values() if len(y))])
        scores = {}
        for split, (x, y) in features.items():
            for metric, value in self.score(np.asarray(y), self.baseline_outputs(model, x, n_classes)).items():
                scores[f"baseline_{split}_{metric}"] = value
        return scores

    def label_issues(self, x, y: np.ndarray, labels: tuple[str, ...], inverse_regularisation: float,
                     max_iter: int) -> LabelIssues | None:
        """Confident learning (``cleanlab.filter.find_label_issues``) on the logistic regression's
        out-of-fold probabilities, ranked by the probability of the given class (self-confidence)."""
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        y = np.asarray(y)
        present, given, counts = np.unique(y, return_inverse=True, return_counts=True)
        # A class of one row leaves the fold that holds it out without the class, and a fold's
        # model of one class cannot be fitted.
        if len(present) < 2 or counts.min() < 2 or len(y) < 2 * LABEL_FOLDS:
            return None
        # Columns of the classes train has, in order: cleanlab wants labels 0..K-1, each present.
        probs = out_of_fold(_estimator(inverse_regularisation, max_iter), x, given, "predict_proba", stratified=True)
        found = find_label_issues(given, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
        quality = get_label_quality_scores(given, probs, method="self_confidence")
        rows = [{"index": int(i), "given": labels[present[given[i]]], "suggested": labels[present[probs[i].argmax()]],
                 "quality": round(float(quality[i]), 4)} for i in found[:LABEL_ISSUES_LISTED]]
        return LabelIssues(f"confident learning (cleanlab), {LABEL_FOLDS}-fold logistic regression",
                           len(y), len(found), rows, round(float((probs.argmax(axis=1) == given).mean()), 4))

    def figures(self, evaluation: Evaluation, labels: tuple[str, ...]) -> dict[str, object]:
        """The confusion matrix over every class."""
        from sklearn.metrics import ConfusionMatrixDisplay

        display = ConfusionMatrixDisplay.from_predictions(
            evaluation.y_true, evaluation.outputs.argmax(axis=-1), labels=list(range(len(labels))),
            display_labels=list(labels), colorbar=False,
        )
        return {"confusion_matrix.png": display.figure_}

    def mistakes(self, evaluation: Evaluation) -> list[tuple[int, int, int]]:
        """``(index, true, predicted)`` of every misclassified example."""
        predicted = evaluation.outputs.argmax(axis=-1)
        return [(i, int(t), int(p)) for i, (t, p) in enumerate(zip(evaluation.y_true, predicted, strict=True)) if t != p]

    def prediction_table(self, outputs: np.ndarray, labels: tuple[str, ...]) -> pd.DataFrame:
        """``label`` (the most probable class) and ``prob_<class>`` for each class."""
        import pandas as pd
        import torch

        probs = torch.softmax(torch.from_numpy(np.asarray(outputs, dtype=np.float32)), dim=-1).numpy()
        frame = pd.DataFrame(probs, columns=[f"prob_{name}" for name in labels])
        frame.insert(0, "label", [labels[i] for i in probs.argmax(axis=1)])
        return frame

    def output_schema(self, labels: tuple[str, ...]):
        """``label`` (string) then one float ``prob_<class>`` per class."""
        from mlflow.types import ColSpec, Schema

        return Schema([ColSpec("string", "label"), *(ColSpec("float", f"prob_{name}") for name in labels)])


def _estimator(inverse_regularisation: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=inverse_regularisation, max_iter=max_iter)


def _softmax(outputs: np.ndarray) -> np.ndarray:
    """Class probabilities of logits, in float64 so that confident examples keep distinct
    probabilities (float32 saturates at 1.0 sooner, tying them for ROC AUC)."""
    from scipy.special import softmax

    return softmax(np.asarray(outputs, dtype=np.float64), axis=-1)
