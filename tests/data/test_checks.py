"""Data checks before the search: planted duplicates and leaks found and counted exactly, dropped
exactly under ``data.dedupe: drop``, a skewed class balance warned about, truncation measured, and
``ftsearch check`` creating no study and no run."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from ftsearch.cli import main
from ftsearch.config import DataConfig
from ftsearch.data.checks import (
    class_balance,
    find_duplicates,
    kept_rows,
    near_duplicate_keys,
    text_keys,
    truncation,
)
from ftsearch.data.text import load_text_splits
from ftsearch.errors import FtsearchError
from tests.helpers import make_reviews, runs, tiny_study


def frame(texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"text": texts, "label": np.zeros(len(texts), dtype=np.int64)})


def keys(frames: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
    return {split: text_keys(f) for split, f in frames.items()}


def test_duplicates_are_found_across_case_and_whitespace_and_leaks_by_split():
    frames = {
        "train": frame(["a good film", "A  good film ", "bad plot", "fine"]),  # one repeat (case, spaces)
        "val": frame(["bad plot", "new one", "new one"]),  # one leak from train, one repeat
        "test": frame(["FINE", "new one", "unseen", "unseen"]),  # leaks from train and val, one repeat
    }
    found = find_duplicates(keys(frames))
    assert found.within == {"train": 1, "val": 1, "test": 1}
    assert found.leaked == {"val": 1, "test": 2}
    kept = {split: frames[split]["text"][mask].tolist() for split, mask in kept_rows(keys(frames)).items()}
    assert kept["train"] == ["a good film", "bad plot", "fine"]
    assert kept["val"] == ["new one", "new one"]  # a repeat within val is not a leak
    assert kept["test"] == ["unseen", "unseen"]


def test_a_pair_is_a_duplicate_only_when_both_texts_are():
    pairs = lambda rows: pd.DataFrame({"text": [a for a, _ in rows], "text_pair": [b for _, b in rows]})
    found = find_duplicates(keys({"train": pairs([("a", "b"), ("a", "c")]), "val": pairs([("a", "b")]),
                                  "test": pairs([("a", "d")])}))
    assert found.within["train"] == 0 and found.leaked == {"val": 1, "test": 0}


FLIPPED = [100, 131, 162, 193]


@pytest.fixture
def leaky_files(tmp_path):
    """A train file with 5 repeated reviews and 4 given the wrong sentiment (``FLIPPED``), and a
    test file of which 7 rows are train reviews."""
    train, test = make_reviews(200, seed=11), make_reviews(40, seed=12)
    train.loc[FLIPPED, "sentiment"] = train.loc[FLIPPED, "sentiment"].map({"neg": "pos", "pos": "neg"})
    train = pd.concat([train, train.head(5)], ignore_index=True)
    test = pd.concat([test, train.iloc[20:27].assign(review=lambda f: f["review"].str.upper())], ignore_index=True)
    paths = {"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"}
    train.to_csv(paths["train"], index=False)
    test.to_csv(paths["test"], index=False)
    return paths


def data_config(paths, **changes) -> DataConfig:
    return DataConfig(dataset=str(paths["train"]), test_file=str(paths["test"]), text_column="review",
                      label_column="sentiment", labels=["neg", "pos"], val_fraction=0.2, **changes)


def test_loading_counts_the_planted_rows_and_drop_removes_exactly_them(leaky_files):
    warned = load_text_splits(data_config(leaky_files))
    duplicates = warned.duplicates
    # The 5 repeats land in train or in the validation split carved from it.
    assert duplicates.within["train"] + duplicates.leaked["val"] == 5 and duplicates.leaked["test"] == 7
    assert len(warned.train) + len(warned.val) == 205 and len(warned.test) == 47

    dropped = load_text_splits(data_config(leaky_files, dedupe="drop"))
    assert dropped.duplicates.dropped["test"] == 7 and len(dropped.test) == 40
    assert sum(dropped.duplicates.dropped.values()) == 12
    assert len(dropped.train) + len(dropped.val) == 200
    after = keys({"train": dropped.train, "val": dropped.val, "test": dropped.test})
    assert find_duplicates(after).leaked == {"val": 0, "test": 0}

    assert load_text_splits(data_config(leaky_files, dedupe="off")).duplicates is None


def test_drop_that_empties_a_split_is_an_error(tmp_path):
    reviews = make_reviews(60, seed=3)
    paths = {"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"}
    reviews.to_csv(paths["train"], index=False)
    reviews.head(10).to_csv(paths["test"], index=False)
    with pytest.raises(FtsearchError, match="drop leaves no test rows"):
        load_text_splits(data_config(paths, dedupe="drop"))


def test_images_within_a_few_hash_bits_share_a_key_chained_across_splits():
    base = 0x0F0F_0F0F_0F0F_0F0F
    near = base ^ 0b111  # 3 bits away
    nearer_to_near = near ^ (0b111 << 8)  # 6 from base, 3 from near: chained to it
    far = base ^ 0xFFFF  # 16 bits away
    hashes = {"train": [f"{base:016x}", f"{far:016x}"], "val": [f"{near:016x}"], "test": [f"{nearer_to_near:016x}"]}
    keys = near_duplicate_keys(hashes, bits=3)
    assert keys["train"][0] == keys["val"][0] == keys["test"][0] != keys["train"][1]
    assert find_duplicates(keys).leaked == {"val": 1, "test": 1}
    assert len(set(np.concatenate(list(near_duplicate_keys(hashes, bits=2).values())))) == 4


def test_a_skewed_class_balance_is_warned_about_under_accuracy_only():
    y = np.array([0] * 80 + [1] * 20)
    balance, warnings = class_balance({"train": y}, ("ham", "spam"), "accuracy")
    assert balance["train"] == {"per_class": {"ham": 80, "spam": 20}, "majority": "ham", "majority_share": 0.8}
    assert len(warnings) == 1 and "80% of train is 'ham'" in warnings[0] and "f1" in warnings[0]
    assert class_balance({"train": y}, ("ham", "spam"), "f1")[1] == []
    multi, _ = class_balance({"train": np.array([[1, 0, 1], [0, 0, 1]], dtype=np.float32)}, ("a", "b", "c"), "f1")
    assert multi["train"] == {"per_label": {"a": 1, "b": 0, "c": 2}, "labels_per_example": 1.5}


def test_truncation_is_the_share_longer_than_each_max_length():
    cut = truncation(np.array([10, 20, 30, 40]), [25, 15])
    assert cut["truncated_share"] == {"15": 0.75, "25": 0.5}
    assert cut["tokens"]["max"] == 40


def test_check_prints_the_findings_and_creates_nothing(tmp_path, tiny_bert, leaky_files, state_dir, capsys):
    study = tiny_study(tiny_bert, leaky_files, **{"data.val_fraction": 0.2})
    study_file = tmp_path / "leaky.yaml"
    study_file.write_text(yaml.safe_dump(study))
    output = tmp_path / "report.json"
    assert main(["check", str(study_file), "--output", str(output)]) == 0
    printed = capsys.readouterr()
    assert "7 test example(s) also appear in train or val" in printed.out + printed.err
    assert "cut: " in printed.out + printed.err
    report = json.loads(output.read_text())
    assert report["duplicates"]["leaked_from_earlier_splits"]["test"] == 7
    assert report["sizes"]["test"] == 47
    assert report["truncation"]["truncated_share"].keys() == {"32"}
    # Every flipped review that landed in train (not in the validation rows carved from it) is
    # listed as a likely label error, with its text.
    reviews = pd.read_csv(leaky_files["train"])["review"]
    train = set(load_text_splits(data_config(leaky_files)).train["text"])
    flipped = {reviews[i] for i in FLIPPED} & train
    listed = {row["text"]: row for row in report["label_issues"]["rows"]}
    assert flipped and flipped <= listed.keys() and report["label_issues"]["found"] <= len(flipped) + 3
    assert {listed[text]["given"] != listed[text]["suggested"] for text in flipped} == {True}
    assert "likely label errors" in printed.out + printed.err
    # No Optuna storage, no MLflow store: nothing to clean up after a look at the data.
    assert not state_dir.exists() or not any(state_dir.iterdir())


def test_a_study_resumed_on_changed_data_is_refused_naming_the_split(tmp_path, tiny_bert, leaky_files, capsys):
    study = tiny_study(tiny_bert, leaky_files, n_trials=1, **{"search.epochs": {"low": 1, "high": 1}})
    study_file = tmp_path / "resumed.yaml"
    study_file.write_text(yaml.safe_dump(study))
    assert main(["search", str(study_file), "--quiet"]) == 0
    report = json.loads(next((tmp_path / "mlruns" / "artifacts").rglob("data_report.json")).read_text())
    assert report["duplicates"]["leaked_from_earlier_splits"]["test"] == 7
    issues = json.loads(next((tmp_path / "mlruns" / "artifacts").rglob("label_issues.json")).read_text())
    assert issues["checked"] == report["sizes"]["train"] and issues["found"] >= 1
    test = pd.read_csv(leaky_files["test"])
    test.iloc[:3].assign(review="a new review").pipe(lambda rows: pd.concat([test, rows])).to_csv(
        leaky_files["test"], index=False)
    capsys.readouterr()
    assert main(["search", str(study_file), "--n-trials", "2", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "was started on other data: the test split(s) changed" in error and "--fresh" in error
    assert main(["search", str(study_file), "--n-trials", "1", "--fresh", "--quiet"]) == 0

    # Each run names the data it saw: the parent all three splits, a trial train and validation.
    inputs = lambda run: {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    parents, children = runs("resumed")
    first, second = sorted(parents, key=lambda run: run.info.start_time)
    assert inputs(first).keys() == {"training", "validation", "test"}
    assert {inputs(child).keys() == {"training", "validation"} for child in children} == {True}
    assert inputs(first)["training"] == inputs(second)["training"]
    assert inputs(first)["test"] != inputs(second)["test"]
