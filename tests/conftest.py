"""Shared fixtures: a tiny randomly initialised BERT, a tiny sentiment data set, study files (the
helpers behind them are in ``tests/helpers.py``).

Everything is built at test time in temporary folders, and every test gets its own state
directory (MLflow store, Optuna storage), so tests never touch the project's mlruns/.
"""

from __future__ import annotations

import os

# Set before transformers / datasets are imported, which read them once: no test may reach for
# the network, so hub lookups fail at once instead of timing out.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from pathlib import Path

import pytest
import yaml

from tests.helpers import build_tiny_bert, draw_shapes, make_reviews, tiny_study


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level vocabulary, saved with save_pretrained."""
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
    # Each trial's model is timed for 0.05 s per latency figure, not the default 1 s: the tiny
    # models' latency is a number to log here, not a ranking (tests/test_cost.py times for longer).
    monkeypatch.setenv("FTSEARCH_LATENCY_SECONDS", "0.05")
    # No system metrics thread beside every tiny trial (tests/test_study.py turns them on to check them).
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield state
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI itself; it must not leak into the next test.
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def write_study(tmp_path, tiny_bert, tiny_reviews):
    """Write a tiny study file (with dotted-key changes) and return its path."""

    def write(name: str = "tiny", **changes) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_study(tiny_bert, tiny_reviews, **changes)))
        return path

    return write


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
