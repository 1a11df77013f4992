"""The classical baseline on data it cannot use: texts of numbers only leave TF-IDF no vocabulary,
so the search trains without a baseline (said, tagged on the parent run, in the report), and a
train split of one class is refused before any study or run exists."""

import random

import pandas as pd
import yaml

from ftsearch import report
from ftsearch.cli import main
from ftsearch.config import load_study
from ftsearch.report.views import comparison_gaps
from tests.helpers import runs, tiny_study


def write_reviews(tmp_path, texts: dict[str, list[str]], labels: dict[str, list[str]]) -> dict:
    paths = {split: tmp_path / f"{split}.csv" for split in texts}
    for split, path in paths.items():
        pd.DataFrame({"review": texts[split], "sentiment": labels[split]}).to_csv(path, index=False)
    return paths


def numbers(n: int, seed: int) -> list[str]:
    """Texts of distinct numbers: no token is in two texts, so TF-IDF (min_df=2) keeps none."""
    rng = random.Random(seed)
    return [" ".join(str(v) for v in rng.sample(range(10**6, 10**7), 3)) for _ in range(n)]


def test_texts_of_numbers_only_search_without_a_baseline_and_say_why(tmp_path, tiny_bert, capsys):
    paths = write_reviews(tmp_path, {"train": numbers(80, 1), "test": numbers(20, 2)},
                          {"train": ["neg", "pos"] * 40, "test": ["neg", "pos"] * 10})
    study = tmp_path / "numbers.yaml"
    study.write_text(yaml.safe_dump(tiny_study(tiny_bert, paths, n_trials=1, **{"search.epochs": {"low": 1, "high": 1}})))

    printed = lambda: "".join(capsys.readouterr())
    assert main(["check", str(study)]) == 0
    assert "likely label errors not checked: the TF-IDF baseline found no word" in printed()

    assert main(["search", str(study)]) == 0
    assert "no baseline: the TF-IDF baseline found no word" in printed()
    (parent,), children = runs("numbers")
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED"]
    assert "baseline" not in parent.data.tags and not any(k.startswith("baseline_") for k in parent.data.metrics)
    assert parent.data.tags["baseline_skipped"].startswith("the TF-IDF baseline found no word")
    gaps = comparison_gaps(report.collect(load_study(str(study))))
    assert gaps[0].startswith("No classical baseline: the TF-IDF baseline found no word")


def test_a_train_split_of_one_class_is_refused_before_anything_exists(tmp_path, tiny_bert, state_dir, capsys):
    reviews = [f"review number {i} of the same kind" for i in range(60)]
    paths = write_reviews(tmp_path, {"train": reviews, "test": reviews[:10]},
                          {"train": ["neg"] * 60, "test": ["neg", "pos"] * 5})
    study = tmp_path / "one-class.yaml"
    study.write_text(yaml.safe_dump(tiny_study(tiny_bert, paths)))
    assert main(["search", str(study)]) == 2
    error = capsys.readouterr().err
    assert "every train example has the same class ('neg', 45 rows)" in error and "data.label_column" in error
    assert not state_dir.exists() or not any(state_dir.iterdir())
