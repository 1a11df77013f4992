"""Multi-label classification: each example has any number of the labels. One sigmoid per label,
binary cross-entropy; micro / macro F1 at tuned decision thresholds and macro average precision."""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from ftsearch.problems.base import LABEL_FOLDS, LABEL_ISSUES_LISTED, Evaluation, LabelIssues, ProblemType, out_of_fold

if TYPE_CHECKING:
    import pandas as pd
    import torch

# The thresholds a label may get. A coarse grid rather than every distinct probability: a
# threshold placed exactly between two validation examples overfits them and moves with every
# epoch, while a grid step is stable and reads well in a report. Rounded so that the values are
# the decimals they look like: the 0.3 that multi-label papers often fix falls exactly on it.
CANDIDATES = np.round(np.arange(0.05, 0.951, 0.05), 2)
# Where a label has nothing to tune on (no positive example), and the tie-breaker's centre.
DEFAULT_THRESHOLD = 0.5
MODES = ("per_label", "global")
# Probabilities are kept this far from 0 and 1 before their logit: a constant predictor's 0 or 1
# would be an infinite logit.
PROBABILITY_CLIP = 1e-6


class MultiLabelClassification(ProblemType):
    """Each example has a set of ``labels``; targets are multi-hot float32 rows ``(n, n_labels)``.

    A label is predicted when its sigmoid probability reaches its threshold. The thresholds are
    tuned (``mode``): ``per_label``, each label its own F1-maximising one, or ``global``, one for
    every label maximising ``metric`` (micro F1 when that is ``f1_micro``, else macro F1). Until
    ``tuned``, every ``score`` tunes them on the outputs it judges (how the validation split is
    judged during the search); ``tuned`` fixes them on validation for the test split and serving.
    """

    name = "multi-label-classification"
    metrics: ClassVar[dict[str, bool]] = {"f1_micro": True, "f1_macro": True, "average_precision": True}
    target_kind = "classes"

    def __init__(self, mode: Literal["per_label", "global"] = "per_label", metric: str = "f1_macro",
                 thresholds: np.ndarray | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"thresholds must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.metric = metric
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self.prevalence: np.ndarray | None = None  # of each label in the training split, once fitted

    def _with(self, **attributes: Any) -> MultiLabelClassification:
        """A copy with ``attributes`` set: the registered instance is shared, so never mutated."""
        other = copy.copy(self)
        for name, value in attributes.items():
            setattr(other, name, value)
        return other

    def fitted(self, train_targets: np.ndarray, thresholds: str = "per_label", metric: str = "f1_macro",
               **ignored: Any) -> MultiLabelClassification:
        """A copy that tunes its thresholds ``thresholds`` (``per_label`` or ``global``); a global
        threshold maximises ``metric``'s F1 (micro for ``f1_micro``, macro otherwise). The train
        targets give each label's prevalence, from which the head starts (``head_bias``);
        thresholds are tuned on validation outputs."""
        if thresholds not in MODES:
            raise ValueError(f"thresholds must be one of {', '.join(MODES)}, not {thresholds!r}")
        targets = np.asarray(train_targets, dtype=np.float64)
        prevalence = targets.mean(axis=0) if targets.ndim == 2 and len(targets) else None
        return self._with(mode=thresholds, metric=metric, thresholds=None, prevalence=prevalence)

    def head_bias(self) -> np.ndarray | None:
        """Each label's log-odds in the training split. With labels as rare as most are (GoEmotions:
        4% on average), a head starting at probability 0.5 spends its first epochs, at fine-tuning
        learning rates, only moving its biases towards the priors, and learns nothing else meanwhile
        (measured: macro-F1 0.05 after an epoch); starting at the priors skips that."""
        if self.prevalence is None:
            return None
        p = np.clip(self.prevalence, 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p)).astype(np.float32)

    def tuned(self, evaluation: Evaluation) -> MultiLabelClassification:
        """A copy whose thresholds are tuned on ``evaluation`` (the validation split) and then kept."""
        return self._with(thresholds=self._tune(np.asarray(evaluation.y_true), _probabilities(evaluation.outputs)))

    def state(self) -> dict[str, Any]:
        """``mode``, ``metric`` and, once tuned, ``thresholds`` (a list of floats, one per label)."""
        state: dict[str, Any] = {"mode": self.mode, "metric": self.metric}
        if self.thresholds is not None:
            state["thresholds"] = [float(t) for t in self.thresholds]
        return state

    def restored(self, state: dict[str, Any]) -> MultiLabelClassification:
        """A copy with a saved ``state``."""
        mode = state.get("mode", self.mode)
        if mode not in MODES:
            raise ValueError(f"thresholds must be one of {', '.join(MODES)}, not {mode!r}")
        thresholds = state.get("thresholds")
        return self._with(mode=mode, metric=state.get("metric", self.metric),
                          thresholds=None if thresholds is None else np.asarray(thresholds, dtype=np.float64))

    def head_size(self, labels: tuple[str, ...]) -> int:
        """One logit per label."""
        return len(labels)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of every label's logit against its 0/1 target."""
        import torch.nn.functional as F

        # In float32 even under bf16 autocast (the logits' sigmoid saturates in bf16).
        return F.binary_cross_entropy_with_logits(outputs.float(), targets.float())

    def score(self, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        """Micro / macro F1 of the thresholded probabilities (this type's thresholds, or, untuned,
        ones tuned on these very outputs) and macro average precision of the probabilities."""
        from sklearn.metrics import average_precision_score

        y_true = _targets(y_true)
        probs = _probabilities(outputs)
        predicted = probs >= self._thresholds_for(y_true, probs)
        # Average precision is undefined for a label without positives (no recall to reach), so
        # it averages over the others; 0.0, the worst, when no label has any.
        present = y_true.sum(axis=0) > 0
        average_precision = (float(average_precision_score(y_true[:, present], probs[:, present], average="macro"))
                             if present.any() else 0.0)
        return {
            "f1_micro": float(_f1(y_true, predicted, "micro")),
            "f1_macro": float(_f1(y_true, predicted, "macro")),
            "average_precision": average_precision,
        }

    def _thresholds_for(self, y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The thresholds ``score`` judges by: this type's, or tuned on ``y_true`` / ``probs``."""
        return self.thresholds if self.thresholds is not None else self._tune(y_true, probs)

    def _tune(self, y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The thresholds (one per label) that maximise F1 on ``y_true`` given ``probs``, among
        ``CANDIDATES``: per label, or one for all labels (see the class docstring)."""
        y_true = _targets(y_true)
        n_labels = y_true.shape[1]
        if self.mode == "global":
            average = "micro" if self.metric == "f1_micro" else "macro"
            f1 = np.array([_f1(y_true, probs >= t, average) for t in CANDIDATES])
            return np.full(n_labels, _best(CANDIDATES, f1))
        # Macro F1 is the mean of the labels' F1, each depending on its own threshold only: each
        # label's best threshold maximises it. One sklearn call per candidate scores every label.
        f1 = np.array([_f1(y_true, probs >= t, None) for t in CANDIDATES])
        positives = y_true.sum(axis=0) > 0
        # A label without positives scores F1 0 at every threshold: nothing to tune, the default.
        return np.array([_best(CANDIDATES, f1[:, j]) if positives[j] else DEFAULT_THRESHOLD for j in range(n_labels)])

    def combine(self, outputs: list[np.ndarray], weights: list[float]) -> np.ndarray:
        """The logit of the weighted mean of the members' label probabilities."""
        from scipy.special import logit

        mean = sum(w * _probabilities(o) for w, o in zip(weights, outputs, strict=True))
        return logit(np.clip(mean, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)).astype(np.float32)

    def fit_baseline(self, x, y: np.ndarray, inverse_regularisation: float, max_iter: int):
        """One-vs-rest logistic regression."""
        model = _estimator(inverse_regularisation, max_iter)
        with warnings.catch_warnings():
            # A label without positives (or without negatives) in train gets a constant predictor;
            # sklearn warns about each, which is expected on rare labels, not a fault.
            warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
            return model.fit(x, _targets(y))

    def baseline_outputs(self, estimator, x, n_outputs: int) -> np.ndarray:
        """The logits of the estimator's label probabilities."""
        from scipy.special import logit

        probs = np.asarray(estimator.predict_proba(x))
        if probs.shape[1] != n_outputs:
            # With a single label sklearn sees a binary problem and returns both columns.
            probs = probs[:, -1:]
        return logit(np.clip(probs, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)).astype(np.float32)

    def baseline_head(self, estimator, n_outputs: int) -> tuple[np.ndarray, np.ndarray]:
        """Label j's logit is its logistic regression's ``w.x + b``. A label that train gives every
        example or none (sklearn's constant predictor) gets weight 0 and the clipped logit of that
        constant, as ``baseline_outputs`` gives it."""
        from scipy.special import logit

        weight = np.zeros((n_outputs, estimator.n_features_in_), dtype=np.float32)
        bias = np.empty(n_outputs, dtype=np.float32)
        for j, label in enumerate(estimator.estimators_):
            if hasattr(label, "coef_"):
                weight[j], bias[j] = label.coef_.ravel(), label.intercept_[0]
            else:
                bias[j] = logit(np.clip(float(label.y_[0]), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP))
        return weight, bias

    def baseline(self, features: dict[str, tuple], inverse_regularisation: float, max_iter: int) -> dict[str, float]:
        """One-vs-rest logistic regression on the train features; its probabilities' logits stand
        in for the model's outputs. The thresholds are tuned on validation (or the first split
        after train) and the other splits are scored with them, as the model's test split is."""
        features = dict(features)
        x_train, y_train = features.pop("train")
        model = self.fit_baseline(x_train, y_train, inverse_regularisation, max_iter)

        def outputs(x) -> np.ndarray:
            return self.baseline_outputs(model, x, _targets(y_train).shape[1])

        if not features:
            return {}
        tune_split = "val" if "val" in features else next(iter(features))
        untuned = self._with(thresholds=None)
        evaluations = {tune_split: untuned.evaluation(_targets(features[tune_split][1]),
                                                      outputs(features[tune_split][0]))}
        tuned = untuned.tuned(evaluations[tune_split])
        for split, (x, y) in features.items():
            if split != tune_split:
                evaluations[split] = tuned.evaluation(_targets(y), outputs(x))
        return {f"baseline_{split}_{metric}": value
                for split in features for metric, value in evaluations[split].metrics.items()}

    def label_issues(self, x, y: np.ndarray, labels: tuple[str, ...], inverse_regularisation: float,
                     max_iter: int) -> LabelIssues | None:
        """Confident learning for multi-label data (``cleanlab.filter.find_label_issues`` with
        ``multi_label=True``) on the one-vs-rest logistic regression's out-of-fold probabilities:
        rows whose given label set the other folds' model finds least likely."""
        from cleanlab.filter import find_label_issues
        from cleanlab.multilabel_classification.rank import get_label_quality_scores

        y = _targets(y)
        positives = y.sum(axis=0)
        if len(y) < 2 * LABEL_FOLDS or not ((positives > 0) & (positives < len(y))).all():
            # cleanlab needs every label both given and not given somewhere in train.
            return None
        probs = out_of_fold(_estimator(inverse_regularisation, max_iter), x, y, "predict_proba", stratified=False)
        given = [np.flatnonzero(row).tolist() for row in y]
        found = find_label_issues(given, probs, multi_label=True, return_indices_ranked_by="self_confidence", n_jobs=1)
        quality = get_label_quality_scores(given, probs)

        def names(ids) -> str:
            return ", ".join(labels[j] for j in ids) or "(none)"

        rows = [{"index": int(i), "given": names(given[i]), "suggested": names(np.flatnonzero(probs[i] >= 0.5)),
                 "quality": round(float(quality[i]), 4)} for i in found[:LABEL_ISSUES_LISTED]]
        return LabelIssues(f"confident learning (cleanlab, multi-label), {LABEL_FOLDS}-fold one-vs-rest "
                           "logistic regression", len(y), len(found), rows,
                           round(float(((probs >= 0.5) == y).all(axis=1).mean()), 4))

    def _per_label(self, evaluation: Evaluation) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The thresholds ``score`` uses and per-label precision, recall, F1 and support at them."""
        from sklearn.metrics import precision_recall_fscore_support

        y_true = _targets(evaluation.y_true)
        probs = _probabilities(evaluation.outputs)
        thresholds = self._thresholds_for(y_true, probs)
        y_true, predicted, options = _multilabel(y_true, probs >= thresholds)
        return thresholds, precision_recall_fscore_support(y_true, predicted, average=None, zero_division=0, **options)

    def figures(self, evaluation: Evaluation, labels: tuple[str, ...]) -> dict[str, object]:
        """``per_label_f1.png``: every label's F1, sorted, each named with its threshold."""
        import matplotlib.pyplot as plt

        thresholds, (_, _, f1, _) = self._per_label(evaluation)
        order = np.argsort(f1, kind="stable")
        figure, axes = plt.subplots(figsize=(7, max(2.5, 0.3 * len(labels) + 1.2)))
        try:
            axes.barh([f"{labels[j]} (t={thresholds[j]:.2f})" for j in order], f1[order])
            axes.set_xlim(0, 1)
            axes.set_xlabel("F1")
            rule = (f"one threshold, {thresholds[0]:.2f}" if self.mode == "global" and len(thresholds)
                    else "thresholds per label")
            axes.set_title(f"F1 per label ({rule})")
            figure.tight_layout()
        except Exception:
            plt.close(figure)
            raise
        return {"per_label_f1.png": figure}

    def tables(self, evaluation: Evaluation, labels: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
        """``per_label.json``: each label's precision, recall, F1, support (positives) and threshold,
        at the thresholds ``score`` uses."""
        thresholds, (precision, recall, f1, support) = self._per_label(evaluation)
        return {"per_label.json": [
            {"label": name, "precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
             "support": int(support[j]), "threshold": float(thresholds[j])}
            for j, name in enumerate(labels)
        ]}

    def mistakes(self, evaluation: Evaluation) -> list[tuple[int, int, int]]:
        """None: the contract's ``(index, true, predicted)`` triples name one class each, which a
        set of labels is not."""
        return []

    def prediction_table(self, outputs: np.ndarray, labels: tuple[str, ...]) -> pd.DataFrame:
        """``labels`` (the names whose probability reaches their threshold, ``", "``-joined in label
        order; ``""`` for none) and ``prob_<label>`` for each label. Untuned thresholds are 0.5."""
        import pandas as pd

        probs = _probabilities(outputs)
        thresholds = self.thresholds if self.thresholds is not None else np.full(len(labels), DEFAULT_THRESHOLD)
        chosen = probs >= thresholds
        frame = pd.DataFrame(probs.astype(np.float32), columns=[f"prob_{name}" for name in labels])
        frame.insert(0, "labels", [", ".join(name for name, on in zip(labels, row, strict=True) if on) for row in chosen])
        return frame

    def output_schema(self, labels: tuple[str, ...]):
        """``labels`` (string) then one float ``prob_<label>`` per label."""
        from mlflow.types import ColSpec, Schema

        return Schema([ColSpec("string", "labels"), *(ColSpec("float", f"prob_{name}") for name in labels)])


def _estimator(inverse_regularisation: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    return OneVsRestClassifier(LogisticRegression(C=inverse_regularisation, max_iter=max_iter))


def _targets(y_true) -> np.ndarray:
    """Multi-hot targets as a 2-D 0/1 integer array, as sklearn's multi-label metrics want them."""
    y_true = np.asarray(y_true)
    return (y_true.reshape(len(y_true), -1) > 0.5).astype(np.int64)


def _multilabel(y_true: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``y_true``, ``predicted`` and the keyword arguments that make scikit-learn score them label
    by label. It reads a single column as a binary problem and would average over its classes 0
    and 1 (F1 of "absent" included); there the label is class 1, so it scores class 1 only."""
    if y_true.shape[1] == 1:
        return y_true[:, 0], np.asarray(predicted)[:, 0], {"labels": [1]}
    return y_true, np.asarray(predicted), {}


def _f1(y_true: np.ndarray, predicted: np.ndarray, average: str | None):
    """scikit-learn's F1 of multi-hot ``predicted`` (``average=None``: one per label); 0 for a
    label never true nor predicted (``zero_division=0``)."""
    from sklearn.metrics import f1_score

    y_true, predicted, options = _multilabel(y_true, predicted)
    return f1_score(y_true, predicted, average=average, zero_division=0, **options)


def _probabilities(outputs) -> np.ndarray:
    """Each label's sigmoid probability, in float64 so that thresholds compare exactly."""
    from scipy.special import expit

    outputs = np.asarray(outputs, dtype=np.float64)
    return expit(outputs.reshape(len(outputs), -1))


def _best(candidates: np.ndarray, values: np.ndarray) -> float:
    """The candidate with the highest value; among ties the one nearest ``DEFAULT_THRESHOLD``
    (the lower of two equally near): a threshold in the middle of a plateau is the safer guess."""
    tied = np.flatnonzero(np.isclose(values, values.max(), rtol=0, atol=1e-12))
    return float(candidates[tied[np.argmin(np.abs(candidates[tied] - DEFAULT_THRESHOLD))]])
