"""Text data: local files and the IMDB mirror, stratified seeded splits, subsampling, validation."""

import os
from pathlib import Path

import pandas as pd
import pytest

from ftsearch.config import DataConfig
from ftsearch.data.text import fingerprint, load_text_splits
from ftsearch.errors import FtsearchError


def config(path, **changes) -> DataConfig:
    base = {"dataset": str(path), "text_column": "review", "label_column": "sentiment", "labels": ["neg", "pos"]}
    return DataConfig(**{**base, **changes})


def test_single_file_gives_stratified_test_then_val_splits(tiny_reviews):
    splits = load_text_splits(config(tiny_reviews["train"], val_fraction=0.25))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 320
    for frame in (splits.train, splits.val, splits.test):
        assert abs(frame["label"].mean() - 0.5) < 0.05
    assert (len(splits.val), len(splits.test)) == (60, 80)


def test_test_file_is_used_as_is_and_splits_are_seeded(tiny_reviews):
    cfg = config(tiny_reviews["train"], test_file=str(tiny_reviews["test"]), val_fraction=0.25)
    a, b = load_text_splits(cfg), load_text_splits(cfg)
    assert len(a.test) == 60 and len(a.train) == 240 and len(a.val) == 80
    assert fingerprint(a.val) == fingerprint(b.val)
    other = load_text_splits(config(tiny_reviews["train"], test_file=str(tiny_reviews["test"]), val_fraction=0.25, split_seed=1))
    assert fingerprint(other.val) != fingerprint(a.val)


def test_subsampling_is_stratified(tiny_reviews):
    splits = load_text_splits(config(tiny_reviews["train"], train_size=40, val_size=20, test_size=10))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 20, 10)
    assert splits.train["label"].sum() == 20


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_other_formats_and_integer_labels(tmp_path, suffix):
    frame = pd.DataFrame({"review": [f"text {i}" for i in range(40)], "sentiment": [i % 2 for i in range(40)]})
    path = tmp_path / f"d{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_json(path, orient="records", lines=True)
    splits = load_text_splits(config(path))
    assert set(splits.train["label"]) == {0, 1}


def test_impossible_subsample_is_a_clear_error(tiny_reviews):
    with pytest.raises(FtsearchError, match="data.test_size 59: cannot draw a stratified subsample of 60 rows"):
        load_text_splits(config(tiny_reviews["train"], test_file=str(tiny_reviews["test"]), test_size=59))


def test_unsupported_format(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(FtsearchError, match="unsupported format '.xlsx'"):
        load_text_splits(config(path))


def test_fingerprint_changes_with_content(tiny_reviews):
    frame = pd.read_csv(tiny_reviews["train"]).rename(columns={"review": "text", "sentiment": "label"})
    changed = frame.copy()
    changed.loc[0, "text"] = "something else"
    assert fingerprint(frame) != fingerprint(changed)


MIRROR = Path(os.environ.get("FTSEARCH_DATA_DIR", "data")) / "imdb" / "train.parquet"


@pytest.mark.skipif(not MIRROR.is_file(), reason="IMDB mirror not found: set FTSEARCH_DATA_DIR (CI sets it)")
def test_imdb_mirror_loads_with_the_cpu_plan_sizes():
    cfg = DataConfig(dataset="imdb", labels=["negative", "positive"], train_size=1600, val_size=400, test_size=1000)
    splits = load_text_splits(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1600, 400, 1000)
    assert splits.train["label"].sum() == 800 and splits.test["label"].sum() == 500
