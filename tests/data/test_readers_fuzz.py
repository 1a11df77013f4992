"""Fuzzing the data readers as the study-file loader is fuzzed: whatever the data files hold (bytes
of any kind, texts and labels of any value), loading them gives splits or FtsearchError (the CLI's
clear message and exit status 2), never a traceback."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftsearch.config import DataConfig
from ftsearch.data.images import load_image_splits
from ftsearch.data.text import load_text_splits
from ftsearch.errors import FtsearchError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SUFFIXES = ["csv", "tsv", "jsonl", "parquet"]
cells = st.one_of(st.none(), st.text(max_size=30), st.integers(-5, 5), st.floats(allow_nan=True),
                  st.sampled_from(["neg", "pos", "", " ", "\x00", "NaN", "1e400", "0", "1"]))


def load_text(path, **options):
    try:
        load_text_splits(DataConfig(dataset=str(path), labels=["neg", "pos"], val_fraction=0.2, **options))
    except FtsearchError as err:
        assert str(err)  # a message, whatever it says


@FUZZ
@given(raw=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES))
def test_arbitrary_bytes_in_a_data_file(tmp_path, raw, suffix):
    path = tmp_path / f"data.{suffix}"
    path.write_bytes(raw)
    load_text(path)


@FUZZ
@given(rows=st.lists(st.tuples(cells, cells), min_size=0, max_size=30), suffix=st.sampled_from(SUFFIXES),
       target=st.sampled_from(["class", "classes", "number"]))
def test_arbitrary_texts_and_labels(tmp_path, rows, suffix, target):
    frame = pd.DataFrame(rows, columns=["text", "label"], dtype=object)
    path = tmp_path / f"data.{suffix}"
    if suffix == "parquet":
        frame.astype(str).to_parquet(path)
    elif suffix == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == "tsv" else ",")
    try:
        load_text_splits(DataConfig(dataset=str(path), labels=None if target == "number" else ["neg", "pos"],
                                    val_fraction=0.2), target_kind=target)
    except FtsearchError as err:
        assert str(err)


@FUZZ
@given(files=st.lists(st.binary(max_size=200), min_size=1, max_size=4), suffix=st.sampled_from(["png", "jpg", "gif"]))
def test_arbitrary_bytes_as_images(tmp_path, files, suffix):
    from PIL import Image

    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), (10 * len(name), 80, 160)).save(buffer, format="PNG")
            (folder / "real.png").write_bytes(buffer.getvalue())
            for i, raw in enumerate(files):
                (folder / f"fuzz-{i}.{suffix}").write_bytes(raw)
    try:
        splits = load_image_splits(DataConfig(dataset=str(tmp_path), dedupe="warn"))
    except FtsearchError as err:
        assert str(err)
    else:
        assert len(splits.train) >= 2


@pytest.mark.parametrize("text", ["\x00 a review with a NUL byte", "word " * 200_000])
def test_a_nul_byte_and_a_megabyte_text_load(tmp_path, text):
    frame = pd.DataFrame({"text": [text] + [f"review {i}" for i in range(19)], "label": ["neg", "pos"] * 10})
    frame.to_csv(tmp_path / "data.csv", index=False)
    splits = load_text_splits(DataConfig(dataset=str(tmp_path / "data.csv"), labels=["neg", "pos"], val_fraction=0.2))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20
