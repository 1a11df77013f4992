"""Single-label classification: one softmax over the classes, cross-entropy, accuracy and macro F1."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ftsearch.problems.base import Evaluation, ProblemType

if TYPE_CHECKING:
    import pandas as pd
    import torch


class SingleLabelClassification(ProblemType):
    """Each example has exactly one of ``labels``; targets are class ids (or, mixed by MixUp /
    CutMix, class probabilities)."""

    name = "single-label-classification"
    metrics: ClassVar[dict[str, bool]] = {"accuracy": True, "f1": True}  # f1: macro-averaged over classes

    def head_size(self, labels: tuple[str, ...]) -> int:
        return len(labels)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        # In float32 even under bf16 autocast; soft targets (mixed batches) are class probabilities.
        return F.cross_entropy(outputs.float(), targets)

    def score(self, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        return self._score_predictions(y_true, outputs.argmax(axis=-1))

    @staticmethod
    def _score_predictions(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score

        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "f1": float(f1_score(y_true, y_pred, average="macro")),
        }

    def baseline(self, features: dict[str, tuple], inverse_regularisation: float, max_iter: int) -> dict[str, float]:
        from sklearn.linear_model import LogisticRegression

        features = dict(features)
        model = LogisticRegression(C=inverse_regularisation, max_iter=max_iter).fit(*features.pop("train"))
        scores = {}
        for split, (x, y) in features.items():
            for metric, value in self._score_predictions(np.asarray(y), model.predict(x)).items():
                scores[f"baseline_{split}_{metric}"] = value
        return scores

    def figures(self, evaluation: Evaluation, labels: tuple[str, ...]) -> dict[str, object]:
        from sklearn.metrics import ConfusionMatrixDisplay

        display = ConfusionMatrixDisplay.from_predictions(
            evaluation.y_true, evaluation.outputs.argmax(axis=-1), labels=list(range(len(labels))),
            display_labels=list(labels), colorbar=False,
        )
        return {"confusion_matrix.png": display.figure_}

    def mistakes(self, evaluation: Evaluation) -> list[tuple[int, int, int]]:
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
        from mlflow.types import ColSpec, Schema

        return Schema([ColSpec("string", "label"), *(ColSpec("float", f"prob_{name}") for name in labels)])
