"""Helpers the tests share (fixtures live in conftest.py): the tiny vocabulary and BERT, synthetic
reviews and shape images, tiny study files, and reading back what a search left behind.

The benchmark's smoke preset (``bench/``) builds its model and data from here too: one definition
for both, and the tests depend on nothing in ``bench/``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

POSITIVE = ["great", "wonderful", "superb", "loved", "brilliant", "moving", "delightful", "excellent"]
NEGATIVE = ["awful", "boring", "terrible", "hated", "dull", "clumsy", "tedious", "dreadful"]
NEUTRAL = ["the", "movie", "film", "plot", "actor", "scene", "was", "and", "a", "story", "ending", "music"]


def make_reviews(n: int, seed: int) -> pd.DataFrame:
    """Short synthetic reviews whose label is carried by a few sentiment words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        cue = POSITIVE if label else NEGATIVE
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(6, 14))]
        for _ in range(2):
            words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
        rows.append({"review": " ".join(words), "sentiment": ["neg", "pos"][label]})
    return pd.DataFrame(rows)


def build_tiny_bert(folder: Path) -> Path:
    """A randomly initialised 2-block BERT (hidden 32) with a word-level vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def tiny_study(tiny_bert: Path, reviews: dict[str, Path], **changes) -> dict:
    """A study mapping over the tiny data and BERT: 2 trials of 4 short epochs."""
    study = {
        "data": {
            "dataset": str(reviews["train"]),
            "test_file": str(reviews["test"]),
            "text_column": "review",
            "label_column": "sentiment",
            "labels": ["neg", "pos"],
            "val_fraction": 0.25,
        },
        "metric": "accuracy",
        "backbones": [str(tiny_bert)],
        "search": {
            "lr": {"low": 4.0e-3, "high": 1.0e-2, "log": True},
            "batch_size": [16],
            "freeze_depth": {"low": 0, "high": 0},
            "epochs": {"low": 4, "high": 4},
            "warmup_ratio": {"low": 0.1, "high": 0.1},
            "max_length": [32],
            "augment": {"token_mask": {"low": 0.0, "high": 0.1}},
        },
        "sampler": {"name": "tpe", "seed": 0, "startup_trials": 2},
        "pruner": {"name": "none"},
        "n_trials": 2,
        "registered_model": "tiny-sentiment",
    }
    for key, value in changes.items():
        node = study
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return study


def draw_shapes(folder: Path, per_class: int, seed: int) -> None:
    """folder/circle/*.png and folder/square/*.png: a filled shape on a noisy dark background."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for shape in ("circle", "square"):
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = rng.integers(0, 80, size=(48, 48, 3), dtype=np.uint8)
            image = Image.fromarray(background)
            draw = ImageDraw.Draw(image)
            x, y = (int(v) for v in rng.integers(12, 36, size=2))
            r = int(rng.integers(7, 11))
            # Circles are reddish and squares bluish, so a tiny CNN learns them in a few epochs.
            bright, dim = int(rng.integers(180, 256)), int(rng.integers(0, 90))
            colour = (bright, dim, dim) if shape == "circle" else (dim, dim, bright)
            box = (x - r, y - r, x + r, y + r)
            draw.ellipse(box, fill=colour) if shape == "circle" else draw.rectangle(box, fill=colour)
            image.save(folder / shape / f"{i}.png")


# Reading back what a search left: the MLflow store and the Optuna storage of the test's state dir.
PARENT = "mlflow.parentRunId"


def store():
    """An MLflow client on the test's tracking store."""
    from mlflow import MlflowClient

    from ftsearch import settings

    uri = settings.tracking_uri()
    return MlflowClient(uri, registry_uri=uri)


def runs(experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of an experiment."""
    client = store()
    exp = client.get_experiment_by_name(experiment)
    everything = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in everything if PARENT not in r.data.tags]
    children = [r for r in everything if PARENT in r.data.tags]
    return parents, children


def optuna_study(name: str):
    """The Optuna study ``name`` in the test's state dir."""
    import optuna

    from ftsearch.distributed.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage())
