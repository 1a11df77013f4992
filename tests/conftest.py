"""Shared fixtures: a tiny randomly initialised BERT, a tiny sentiment data set, study files.

Everything is built at test time in temporary folders, and every test gets its own state
directory (MLflow store, Optuna storage), so tests never touch the project's mlruns/.
"""

from __future__ import annotations

import os

# Set before transformers / datasets are imported, which read them once: no test may reach for
# the network, so hub lookups fail at once instead of timing out.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import random
from pathlib import Path

import pandas as pd
import pytest
import yaml

# The benchmark's smoke preset uses the same tiny vocabulary and BERT: one definition for both.
from bench.common import NEGATIVE, NEUTRAL, POSITIVE


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


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level vocabulary, saved with save_pretrained."""
    from bench.common import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_reviews(tmp_path_factory) -> dict[str, Path]:
    """train.csv (320 rows) and test.csv (60 rows) with columns review / sentiment (pos, neg)."""
    folder = tmp_path_factory.mktemp("reviews")
    paths = {"train": folder / "train.csv", "test": folder / "test.csv"}
    make_reviews(320, seed=1).to_csv(paths["train"], index=False)
    make_reviews(60, seed=2).to_csv(paths["test"], index=False)
    return paths


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Each test gets its own MLflow store, Optuna storage and caches."""
    state = tmp_path / "mlruns"
    monkeypatch.setenv("FTSEARCH_STATE_DIR", str(state))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield state
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI itself; it must not leak into the next test.
    os.environ.pop("MLFLOW_TRACKING_URI", None)


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


@pytest.fixture
def write_study(tmp_path, tiny_bert, tiny_reviews):
    """Write a tiny study file (with dotted-key changes) and return its path."""

    def write(name: str = "tiny", **changes) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_study(tiny_bert, tiny_reviews, **changes)))
        return path

    return write


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


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """train/ and val/ ImageFolders of circles and squares, with one truncated JPEG and one
    placeholder graphic in train/circle."""
    from PIL import Image

    root = tmp_path_factory.mktemp("shapes")
    draw_shapes(root / "train", 40, seed=1)
    draw_shapes(root / "val", 16, seed=2)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "train" / "circle" / "full.jpg")
    data = (root / "train" / "circle" / "full.jpg").read_bytes()
    (root / "train" / "circle" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "train" / "circle" / "full.jpg").unlink()
    Image.new("P", (64, 64), 3).save(root / "train" / "circle" / "placeholder.gif")
    return root


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory) -> Path:
    """timm's test_efficientnet (0.36M parameters) saved in timm's folder layout, 48 px inputs."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    folder = tmp_path_factory.mktemp("tiny-cnn")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 48, 48), "crop_pct": 1.0}
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for the browser tests: skipped without it, failed where CI requires it."""
    import shutil

    path = shutil.which("chromium")
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("FTSEARCH_REQUIRE_BROWSER"):
            pytest.fail(f"FTSEARCH_REQUIRE_BROWSER is set but {reason}")
        pytest.skip(reason)
    return path


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

    from ftsearch.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage())
