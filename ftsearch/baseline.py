"""Features for the classical baselines trained on the study's own splits, for context: what does
fine-tuning buy?

Text: bigram TF-IDF. Images: the frozen, pooled features of a pretrained backbone (a linear
probe). The estimator fitted on them and the metrics it is scored by are the problem type's
(``ProblemType.baseline``): logistic regression for classification, one-vs-rest logistic
regression for multi-label, ridge regression for regression.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from torch.utils.data import DataLoader

from ftsearch.data.text import target_array
from ftsearch.errors import BaselineUnavailable


class TfidfText:
    """Bigram TF-IDF features of texts (or pairs of texts), the vocabulary fitted on train.

    A pair's features are both texts', their absolute difference and their product: what the two
    texts share and where they differ (the InferSent recipe, on TF-IDF), which a linear model
    cannot form from the two alone."""

    def __init__(self, vectorizer: TfidfVectorizer, pair: bool):
        self.vectorizer, self.pair = vectorizer, pair

    @classmethod
    def fit(cls, train: pd.DataFrame) -> TfidfText:
        """Fitted on ``train`` (``text`` and, for pairs, ``text_pair``)."""
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=500_000)
        pair = "text_pair" in train
        try:
            vectorizer.fit(pd.concat([train["text"], train["text_pair"]]) if pair else train["text"])
        except ValueError as err:  # "empty vocabulary" / "After pruning, no terms remain": no word is in two texts
            raise BaselineUnavailable(
                f"the TF-IDF baseline found no word of two or more letters or digits used in at least two train texts "
                f"({err}); texts of numbers, symbols or single characters only have none"
            ) from err
        return cls(vectorizer, pair)

    def transform(self, texts: list[str], pairs: list[str] | None = None):
        """The sparse feature matrix of ``texts`` (and their ``pairs``)."""
        a = self.vectorizer.transform(texts)
        if not self.pair:
            return a
        b = self.vectorizer.transform(pairs)
        return sparse.hstack([a, b, abs(a - b), a.multiply(b)]).tocsr()

    def frame(self, frame: pd.DataFrame):
        """The features of a split's frame."""
        return self.transform(frame["text"].tolist(), frame["text_pair"].tolist() if self.pair else None)


def tfidf_features(splits: dict[str, pd.DataFrame]) -> tuple[TfidfText, dict[str, tuple]]:
    """The features fitted on ``splits['train']`` and ``{split: (tf-idf matrix, targets)}`` (frames
    with ``text``, ``label`` and, for pairs, ``text_pair``)."""
    features = TfidfText.fit(splits["train"])
    return features, {split: (features.frame(frame), target_array(frame)) for split, frame in splits.items()}


@torch.inference_mode()
def _pooled_features(backbone: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    backbone.eval()
    features, labels = [], []
    for batch in loader:
        features.append(backbone(batch["pixel_values"]).float().numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(features), np.concatenate(labels)


def pooled_features(backbone: torch.nn.Module, loaders: dict[str, DataLoader]) -> dict[str, tuple]:
    """``{split: (pooled features, labels)}`` of the frozen backbone with its head removed."""
    from ftsearch.models.vision import replace_head

    replace_head(backbone, torch.nn.Identity())
    return {split: _pooled_features(backbone, loader) for split, loader in loaders.items()}
