"""Classical baselines trained on the study's own splits, for context: what does fine-tuning buy?

Text: bigram TF-IDF + logistic regression. Images: a linear probe (logistic regression) on the
frozen, pooled features of a pretrained backbone. Both are scored on validation and test.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader


def _scores(model, features: dict[str, tuple]) -> dict[str, float]:
    scores = {}
    for split, (x, y) in features.items():
        predicted = model.predict(x)
        scores[f"baseline_{split}_accuracy"] = float(accuracy_score(y, predicted))
        scores[f"baseline_{split}_f1"] = float(f1_score(y, predicted, average="macro"))
    return scores


def tfidf_logistic_regression(train, val, test) -> dict[str, float]:
    """Fit on ``train`` (frames with text and label), score on ``val`` and ``test``."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=500_000)
    x_train = vectorizer.fit_transform(train["text"])
    model = LogisticRegression(C=4.0, max_iter=2000).fit(x_train, train["label"])
    return _scores(model, {s: (vectorizer.transform(f["text"]), f["label"]) for s, f in (("val", val), ("test", test))})


@torch.inference_mode()
def _pooled_features(backbone: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    backbone.eval()
    features, labels = [], []
    for batch in loader:
        features.append(backbone(batch["pixel_values"]).float().numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(features), np.concatenate(labels)


def linear_probe(backbone: torch.nn.Module, loaders: dict[str, DataLoader]) -> dict[str, float]:
    """Logistic regression on the frozen backbone's pooled features (its head removed) of
    ``loaders['train']``, scored on the other loaders."""
    from ftsearch.models.vision import replace_head

    replace_head(backbone, torch.nn.Identity())
    features = {split: _pooled_features(backbone, loader) for split, loader in loaders.items()}
    model = LogisticRegression(C=1.0, max_iter=5000).fit(*features.pop("train"))
    return _scores(model, features)
