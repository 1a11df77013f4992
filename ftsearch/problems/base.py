"""What every problem type gives the rest of ftsearch: the contract of the problem-type seam.

A problem type says what a model predicts and how it is judged, whatever the data's modality:
its head (how many outputs), its loss, its metrics and which way each is better, its classical
baseline's estimator, its figures, and what a served model returns. The training loop, the
trial, the study, the report and the registry ask it; none of them branches on accuracy, F1 or
argmax.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:  # torch and pandas load only where a model trains or predicts: readers stay fast
    import pandas as pd
    import torch


@dataclass(frozen=True)
class Evaluation:
    """A model's outputs on a split (``outputs``: one row per example, as the head produced them,
    in float32), the targets they are judged against, and the problem type's metrics of them."""

    metrics: dict[str, float]
    y_true: np.ndarray
    outputs: np.ndarray


@dataclass(frozen=True)
class LabelIssues:
    """Train examples whose given target the baseline, fitted without them (out of fold), finds
    least likely: ``rows`` (``index`` in train, ``given``, ``suggested``, ``quality`` in [0, 1],
    lower is worse), worst first, at most ``LABEL_ISSUES_LISTED`` of the ``found``. ``agreement``
    is the share of rows whose out-of-fold prediction is their given target (None for numbers): a
    weak estimator flags more rows, and the count should be read with it. Informational: nothing is
    dropped."""

    method: str
    checked: int
    found: int
    rows: list[dict[str, Any]]
    agreement: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "checked": self.checked, "found": self.found, "agreement": self.agreement,
                "rows": self.rows}


LABEL_ISSUES_LISTED = 50
LABEL_FOLDS = 5  # cleanlab's own default for out-of-fold probabilities


def out_of_fold(estimator, x, y: np.ndarray, method: str, *, stratified: bool) -> np.ndarray:
    """``estimator``'s ``method`` output for every row, each from a fit on the other folds: what
    the model thinks of a row it never saw, the input of confident learning."""
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict

    folds = (StratifiedKFold if stratified else KFold)(LABEL_FOLDS, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        # A class with fewer rows than folds is missing from some fits: expected on rare classes.
        warnings.filterwarnings("ignore", message="The least populated class")
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        return np.asarray(cross_val_predict(estimator, x, y, cv=folds, method=method))


class ProblemType(ABC):
    """One kind of prediction problem; see the module docstring. Subclasses register themselves
    in ``ftsearch.problems.PROBLEM_TYPES`` by ``name``."""

    name: ClassVar[str]
    # metric name -> True when higher is better; every metric is computed and logged each epoch.
    # The first is the study's default ``metric:``.
    metrics: ClassVar[dict[str, bool]]
    # What one example's target is, as the data layer parses it: a class id ("class"), a set of
    # class ids ("classes", multi-hot float32 rows), or a number ("number", float32).
    target_kind: ClassVar[Literal["class", "classes", "number"]] = "class"

    def metrics_for(self, n_labels: int | None) -> list[str]:
        """The metrics that apply with ``n_labels`` classes (all of them unless a type says)."""
        return list(self.metrics)

    def fitted(self, train_targets: np.ndarray, **options: Any) -> ProblemType:
        """This problem type with what it learns from the training targets and the study's options
        (regression: the target's mean and spread, ``target_range``; multi-label: ``thresholds``).
        Stateless types return themselves."""
        return self

    def head_bias(self) -> np.ndarray | None:
        """The bias a fresh head starts with (one per output), from what ``fitted`` learnt; None
        keeps the model's own initialisation."""
        return None

    def tuned(self, evaluation: Evaluation) -> ProblemType:
        """This problem type with its decision rule tuned on a validation evaluation (multi-label:
        the thresholds); the tuned type is saved with the model and scores the test split."""
        return self

    def state(self) -> dict[str, Any]:
        """What ``fitted`` / ``tuned`` learnt, as JSON, saved with the model (``ftsearch.json``)."""
        return {}

    def meta(self) -> dict[str, Any]:
        """What a saved model's ``ftsearch.json`` records of its problem type (read back by
        ``ftsearch.predictor.saved_problem``)."""
        return {"problem": self.name, "problem_state": self.state()}

    def restored(self, state: dict[str, Any]) -> ProblemType:
        """This problem type with a saved ``state`` (the inverse of ``state``)."""
        return self

    def tables(self, evaluation: Evaluation, labels: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
        """Tables of an evaluation (rows of column -> value), by JSON artifact name without a split
        prefix: multi-label's per-label precision / recall / F1. None by default."""
        return {}

    def direction(self, metric: str) -> str:
        """``maximize`` or ``minimize``, as Optuna and the registry's promotion read it."""
        return "maximize" if self.metrics[metric] else "minimize"

    def better(self, metric: str, value: float, than: float) -> bool:
        """Whether ``value`` of ``metric`` beats ``than`` (strictly)."""
        return value > than if self.metrics[metric] else value < than

    @abstractmethod
    def head_size(self, labels: tuple[str, ...]) -> int:
        """How many outputs the model's head needs."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (called under the loop's autocast)."""

    @abstractmethod
    def score(self, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        """Every metric of this problem type, computed with scikit-learn / scipy."""

    def evaluation(self, y_true: np.ndarray, outputs: np.ndarray) -> Evaluation:
        """``outputs`` judged against ``y_true``."""
        return Evaluation(self.score(y_true, outputs), y_true, outputs)

    @abstractmethod
    def combine(self, outputs: list[np.ndarray], weights: list[float]) -> np.ndarray:
        """Several models' outputs for the same examples as one model's outputs: what they predict
        averaged with ``weights`` (summing to 1), in the space the head produces (class
        probabilities averaged, then their log; label probabilities, then their logit; numbers)."""

    @abstractmethod
    def fit_baseline(self, x, y: np.ndarray, inverse_regularisation: float, max_iter: int):
        """The classical estimator (scikit-learn) fitted on the train features ``x`` and targets ``y``."""

    @abstractmethod
    def baseline_outputs(self, estimator, x, n_outputs: int) -> np.ndarray:
        """A fitted baseline's outputs for ``x``, as the model's head would give them (``n_outputs``
        columns), so that it is scored, combined and served like a model."""

    @abstractmethod
    def baseline_head(self, estimator, n_outputs: int) -> tuple[np.ndarray, np.ndarray]:
        """A fitted baseline as the ``(weight, bias)`` of a linear layer (``n_outputs`` rows) whose
        outputs on the baseline's features are ``baseline_outputs``' up to what the problem type
        reads from them, so that a linear probe is saved and served as one model."""

    @abstractmethod
    def baseline(self, features: dict[str, tuple], inverse_regularisation: float, max_iter: int) -> dict[str, float]:
        """Fit the classical estimator on ``features['train']`` (``(x, y)``) and score it on the
        other splits: ``{"baseline_<split>_<metric>": value}`` for every metric. The modality
        made the features and knows how strongly they need regularising."""

    @abstractmethod
    def label_issues(self, x, y: np.ndarray, labels: tuple[str, ...], inverse_regularisation: float,
                     max_iter: int) -> LabelIssues | None:
        """The train rows ``(x, y)`` whose given target looks wrong to the baseline's estimator
        fitted on the other folds; None when train is too small to hold out folds, or a class
        (multi-label: a label) is too rare or too common to be judged that way."""

    @abstractmethod
    def figures(self, evaluation: Evaluation, labels: tuple[str, ...]) -> dict[str, object]:
        """Matplotlib figures of an evaluation, by artifact name (without a split prefix)."""

    @abstractmethod
    def mistakes(self, evaluation: Evaluation) -> list[tuple[int, int, int]]:
        """``(example index, true, predicted)`` of the examples the model got wrong, for the
        modality to show (an image grid, for images)."""

    @abstractmethod
    def prediction_table(self, outputs: np.ndarray, labels: tuple[str, ...]) -> pd.DataFrame:
        """What a served model returns for a batch of outputs, one row per example."""

    @abstractmethod
    def output_schema(self, labels: tuple[str, ...]):
        """The MLflow ``Schema`` of ``prediction_table``'s columns, for the served signature."""
