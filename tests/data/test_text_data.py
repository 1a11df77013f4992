"""Text data: local files of every format and the data mirror (IMDB, SICK, GoEmotions), seeded splits,
subsampling, sentence pairs, multi-label and numeric targets, and errors that point at the bad row."""

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ftsearch.config import DataConfig
from ftsearch.data.text import fingerprint, load_text_splits, target_array
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
    with pytest.raises(FtsearchError, match=r"unsupported format '.xlsx'; use one of .csv, .tsv, .*set data.format"):
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


# --- Files of every format, sentence pairs, multi-label and numeric targets ---

LABELS = ["joy", "anger", "fear"]
PAIRS = {"text_column": "sentence_A", "text_pair_column": "sentence_B", "label_column": "judgment",
         "labels": ["NO", "YES"]}


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pairs_file(tmp_path: Path, name: str = "pairs.tsv", changes: dict | None = None) -> Path:
    """A SICK-like .tsv with a header (40 rows): an unbalanced quote in every first text, a second
    text "NA", a score and a judgment; ``changes`` maps (1-based row, column) to a new cell."""
    header = ["pair_ID", "sentence_A", "sentence_B", "score", "judgment"]
    lines = ["\t".join(header)]
    lines += [f'{i}\tshe said "hi {i}\tNA\t{1 + i % 5 * 0.5}\t{["NO", "YES"][i % 2]}' for i in range(40)]
    for (row, column), value in (changes or {}).items():
        cells = lines[row].split("\t")
        cells[header.index(column)] = value
        lines[row] = "\t".join(cells)
    return write(tmp_path / name, lines)


def every_row(splits) -> pd.DataFrame:
    return pd.concat([splits.train, splits.val, splits.test], ignore_index=True)


@pytest.mark.parametrize(("name", "fmt"), [("pairs.tsv", None), ("pairs.txt", "tsv")])
def test_tsv_with_a_header_gives_pairs_and_keeps_quotes_and_na_texts(tmp_path, name, fmt):
    path = pairs_file(tmp_path, name)
    splits = load_text_splits(DataConfig(dataset=str(path), format=fmt, **PAIRS))
    rows = every_row(splits)
    assert len(rows) == 40 and list(splits.train.columns) == ["text", "text_pair", "label"]
    assert set(rows["text"]) == {f'she said "hi {i}' for i in range(40)} and set(rows["text_pair"]) == {"NA"}
    assert splits.train["label"].dtype == np.int64 and set(rows["label"]) == {0, 1}


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_headerless_files_take_their_column_names_from_data_columns(tmp_path, fmt):
    sep = "," if fmt == "csv" else "\t"
    path = write(tmp_path / f"d.{fmt}", [f"text {i}{sep}{['neg', 'pos'][i % 2]}" for i in range(40)])
    splits = load_text_splits(config(path, columns=["review", "sentiment"]))
    rows = every_row(splits)
    assert len(rows) == 40 and "text 0" in set(rows["text"])


def reviews_tsv(path: Path, n: int, prefix: str) -> Path:
    return write(path, ["review\tsentiment"] + [f"{prefix} {i}\t{['neg', 'pos'][i % 2]}" for i in range(n)])


def test_val_file_is_used_as_is(tmp_path):
    train, val, test = (reviews_tsv(tmp_path / f"{p}.tsv", n, p) for p, n in (("train", 40), ("val", 12), ("test", 10)))
    splits = load_text_splits(config(train, val_file=str(val), test_file=str(test)))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 12, 10)
    assert splits.val["text"].tolist() == [f"val {i}" for i in range(12)]
    # Without a test file the test split is held out of train; the validation file stays whole.
    splits = load_text_splits(config(train, val_file=str(val), val_fraction=0.25))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 12, 10)


def test_labels_file_is_found_next_to_the_study(tmp_path):
    (tmp_path / "names.txt").write_text("neg\n\npos\n")
    data = reviews_tsv(tmp_path / "train.tsv", 40, "r")
    splits = load_text_splits(config(data, labels=None, labels_file="names.txt"), study_dir=tmp_path)
    assert splits.labels == ("neg", "pos") and set(every_row(splits)["label"]) == {0, 1}


def multi_hot(frame: pd.DataFrame) -> dict[str, tuple]:
    return {text: tuple(vector) for text, vector in zip(frame["text"], frame["label"])}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_multi_label_from_lists_of_names_and_ids(tmp_path, suffix):
    cells = [["joy", "anger"], [2], [], ["joy", 0, "0"]] if suffix == ".jsonl" else [[0, 1], [2], [], [0, 0]]
    frame = pd.DataFrame({"text": [f"t {i}" for i in range(40)], "tags": cells * 10})
    path = tmp_path / f"m{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_json(path, orient="records", lines=True)
    splits = load_text_splits(DataConfig(dataset=str(path), label_column="tags", labels=LABELS), target_kind="classes")
    got = multi_hot(every_row(splits))
    assert [got[f"t {i}"] for i in range(4)] == [(1, 1, 0), (0, 0, 1), (0, 0, 0), (1, 0, 0)]
    assert splits.labels == tuple(LABELS) and splits.train["label"].iloc[0].dtype == np.float32


def test_multi_label_from_a_delimited_string(tmp_path):
    cells = ["0,1", "2", "", " anger , fear ", "1,1"] * 8
    path = write(tmp_path / "go.tsv", [f"text {i}\t{cell}\tid{i}" for i, cell in enumerate(cells)])
    cfg = DataConfig(dataset=str(path), columns=["text", "labels", "id"], label_column="labels", label_separator=",",
                     labels=LABELS)
    splits = load_text_splits(cfg, target_kind="classes")
    got = multi_hot(every_row(splits))
    assert [got[f"text {i}"] for i in range(5)] == [(1, 1, 0), (0, 0, 1), (0, 0, 0), (0, 1, 1), (0, 1, 0)]
    assert target_array(splits.train).shape == (len(splits.train), 3)


def test_regression_targets_are_floats(tmp_path):
    cfg = DataConfig(dataset=str(pairs_file(tmp_path)), **{**PAIRS, "label_column": "score", "labels": None})
    splits = load_text_splits(cfg, target_kind="number")
    assert splits.labels == () and splits.train["label"].dtype == np.float64
    assert set(every_row(splits)["label"]) == {1.0, 1.5, 2.0, 2.5, 3.0}
    assert "text_pair" in splits.val.columns


def hot(*vectors) -> pd.Series:
    return pd.Series([np.asarray(v, dtype=np.float32) for v in vectors], dtype=object)


def test_target_array_dtypes_and_shapes():
    ids = pd.DataFrame({"text": ["a", "b"], "label": np.array([0, 2], dtype=np.int64)})
    numbers = pd.DataFrame({"text": ["a", "b"], "label": [0.5, 1.25]})
    classes = pd.DataFrame({"text": ["a", "b"], "label": hot([1, 0, 1], [0, 0, 0])})
    assert (target_array(ids).dtype, target_array(ids).shape) == (np.int64, (2,))
    assert (target_array(numbers).dtype, target_array(numbers).shape) == (np.float32, (2,))
    assert (target_array(classes).dtype, target_array(classes).shape) == (np.float32, (2, 3))
    assert target_array(classes).tolist() == [[1, 0, 1], [0, 0, 0]]


def test_fingerprint_covers_the_pair_and_multi_hot_labels():
    frame = pd.DataFrame({"text": ["a", "b"], "text_pair": ["c", "d"], "label": hot([1, 0, 1], [0, 0, 0])})
    pair_changed, label_changed = frame.copy(), frame.copy()
    pair_changed.loc[1, "text_pair"] = "e"
    label_changed["label"] = hot([1, 0, 1], [0, 1, 0])
    prints = [fingerprint(f) for f in (frame, pair_changed, label_changed, frame.drop(columns="text_pair"))]
    assert len(set(prints)) == 4 and all(len(p) == 16 for p in prints)
    assert fingerprint(frame.copy()) == prints[0]


# --- Each bad input names the file, the row (and line) and the column ---

NUMBER = {**PAIRS, "label_column": "score", "labels": None}


@pytest.mark.parametrize(
    ("changes", "options", "kind", "expected"),
    [
        ({(17, "score"): "high"}, NUMBER, "number",
         ["pairs.tsv", "1 value(s) in column 'score' are not numbers", "row 17 (line 18) 'high'"]),
        ({(3, "judgment"): "MAYBE"}, PAIRS, "class",
         ["pairs.tsv", "column 'judgment'", "not among the declared classes ['NO', 'YES']", "row 3 (line 4) 'MAYBE'"]),
        ({(5, "sentence_B"): "  "}, PAIRS, "class",
         ["pairs.tsv", "1 empty text(s) in column 'sentence_B'", "row 5 (line 6) '  '"]),
        ({(r, "score"): "" for r in range(2, 14)}, NUMBER, "number",
         ["12 value(s) in column 'score'", "row 2 (line 3) ''", "row 6 (line 7) ''", ", ... (12 in all)"]),
        ({}, {**PAIRS, "label_column": "relatedness"}, "class",
         ["pairs.tsv", "column(s) relatedness not found", "pair_ID, sentence_A, sentence_B, score, judgment",
          "data.label_column"]),
        ({}, {**PAIRS, "columns": ["a", "sentence_A"]}, "class",
         ["pairs.tsv has 5 columns, data.columns names 2 (a, sentence_A)"]),
    ],
    ids=["not-a-number", "unknown-label", "empty-second-text", "many-bad-rows", "missing-column", "column-count"],
)
def test_bad_values_name_the_file_row_and_column(tmp_path, changes, options, kind, expected):
    cfg = DataConfig(dataset=str(pairs_file(tmp_path, changes=changes)), **options)
    with pytest.raises(FtsearchError) as caught:
        load_text_splits(cfg, target_kind=kind)
    for text in expected:
        assert text in str(caught.value)
    assert "row 7 " not in str(caught.value)  # at most 5 rows are quoted


def test_multi_label_unknown_part_names_the_cell(tmp_path):
    path = write(tmp_path / "go.tsv", [f"text {i}\t{'0,7' if i == 3 else '1'}\tid" for i in range(20)])
    cfg = DataConfig(dataset=str(path), columns=["text", "labels", "id"], label_column="labels", label_separator=",",
                     labels=LABELS)
    expected = r"go.tsv: 1 cell\(s\) in column 'labels' hold labels not among .* row 4 \(line 4\) '0,7'"
    with pytest.raises(FtsearchError, match=expected):
        load_text_splits(cfg, target_kind="classes")


def test_line_numbers_count_quoted_line_breaks_and_jsonl_has_rows_only(tmp_path):
    frame = pd.DataFrame({"review": ["two\nlines", "fine", "third"] * 8, "sentiment": ["pos", "neg", "meh"] * 8})
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(FtsearchError, match=r"8 label\(s\) in column 'sentiment' .*: row 3 \(line 5\) 'meh'"):
        load_text_splits(config(tmp_path / "d.csv"))
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    with pytest.raises(FtsearchError, match=r"d.jsonl: 8 label\(s\) .*: row 3 'meh', row 6 'meh'"):
        load_text_splits(config(tmp_path / "d.jsonl"))


@pytest.mark.parametrize(
    ("files", "options", "kind", "message"),
    [
        ({"d.jsonl": '{"review": "a", "sentiment": "pos"}\n'}, {"columns": ["review", "sentiment"]}, "class",
         "data.columns names the columns of .csv / .tsv files without a header row"),
        ({"d.csv": ""}, {}, "class", "d.csv is empty"),
        ({"d.csv": "review,sentiment\n"}, {}, "class", "d.csv has no rows"),
        ({"d.csv": "review,sentiment\na,pos\n"}, {"labels": None}, "class", "set data.labels"),
        ({"d.csv": "review,sentiment\na,1.5\n"}, {}, "number", "a numeric target has no classes"),
        ({"d.csv": "review,sentiment\na,pos\n", "names.txt": "neg\nneg\n"},
         {"labels": None, "labels_file": "names.txt"}, "class", "names 'neg' more than once"),
    ],
    ids=["columns-with-jsonl", "empty-file", "header-only", "no-class-names", "number-with-classes", "repeated-name"],
)
def test_bad_setups_are_clear_errors(tmp_path, files, options, kind, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(FtsearchError, match=re.escape(message)):
        load_text_splits(config(tmp_path / next(iter(files)), **options), tmp_path, target_kind=kind)


def test_unknown_target_kind_is_a_programming_error(tiny_reviews):
    with pytest.raises(ValueError, match="target_kind 'label'"):
        load_text_splits(config(tiny_reviews["train"]), target_kind="label")


# --- The real SICK and GoEmotions files of the local data mirror ---

DATA_DIR = Path(os.environ.get("FTSEARCH_DATA_DIR", "data"))
SICK = {"dataset": "sick/SICK_train.txt", "format": "tsv", "val_file": "sick/SICK_trial.txt",
        "test_file": "sick/SICK_test_annotated.txt", "text_column": "sentence_A", "text_pair_column": "sentence_B"}
GOEMOTIONS = {"dataset": "goemotions/train.tsv", "val_file": "goemotions/dev.tsv", "test_file": "goemotions/test.tsv",
              "columns": ["text", "labels", "id"], "label_column": "labels", "label_separator": ",",
              "labels_file": "goemotions/labels.txt"}


def mirrored(*names: str):
    return pytest.mark.skipif(not all((DATA_DIR / n).is_file() for n in names),
                              reason="data mirror not found: set FTSEARCH_DATA_DIR (CI sets it)")


@mirrored("sick/SICK_train.txt", "sick/SICK_trial.txt", "sick/SICK_test_annotated.txt")
def test_sick_entailment_pairs_load_whole():
    cfg = DataConfig(**SICK, label_column="entailment_judgment", labels=["NEUTRAL", "ENTAILMENT", "CONTRADICTION"])
    splits = load_text_splits(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4500, 500, 4927)
    for frame in (splits.train, splits.val, splits.test):
        assert set(frame["label"]) == {0, 1, 2} and frame["text_pair"].str.len().min() > 0


@mirrored("sick/SICK_train.txt", "sick/SICK_trial.txt", "sick/SICK_test_annotated.txt")
def test_sick_relatedness_loads_as_numbers_from_1_to_5():
    splits = load_text_splits(DataConfig(**SICK, label_column="relatedness_score"), target_kind="number")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4500, 500, 4927)
    for frame in (splits.train, splits.val, splits.test):
        assert frame["label"].between(1, 5).all() and frame["label"].nunique() > 10


@mirrored("goemotions/train.tsv", "goemotions/dev.tsv", "goemotions/test.tsv", "goemotions/labels.txt")
def test_goemotions_loads_as_multi_label():
    splits = load_text_splits(DataConfig(**GOEMOTIONS), target_kind="classes")
    assert len(splits.labels) == 28 and splits.labels[27] == "neutral"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (43410, 5426, 5427)
    targets = target_array(splits.train)
    assert targets.shape == (43410, 28) and (targets.sum(axis=1) >= 2).any() and (targets.sum(axis=1) >= 1).all()


def test_a_file_key_with_a_catalog_data_set_is_an_error_not_ignored():
    cfg = DataConfig(dataset="imdb", labels=["negative", "positive"], val_file="my_val.csv")
    with pytest.raises(FtsearchError, match="data.val_file cannot be used with the catalog data set 'imdb'"):
        load_text_splits(cfg)


def test_a_column_of_ids_taken_for_labels_is_a_short_clear_error(tmp_path):
    """sklearn's own message names every class with one row: 10,000 of them are 60 KB of error."""
    ids = [f"id-{i}" for i in range(2000)]
    pd.DataFrame({"text": [f"text {i}" for i in range(2000)], "label": ids}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(FtsearchError) as raised:
        load_text_splits(DataConfig(dataset=str(tmp_path / "d.csv"), labels=ids))
    message = str(raised.value)
    assert "2000 of the 2000 classes have a single row" in message and "is the label column an id?" in message
    assert len(message) < 400
