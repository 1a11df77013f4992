"""The real all-MiniLM-L6-v2 weights, fine-tuned for a few steps (slow: run with -m slow)."""

import os
from pathlib import Path

import pytest

from ftsearch.cli import main

MIRROR = Path(os.environ.get("FTSEARCH_DATA_DIR", "data")) / "imdb" / "train.parquet"


@pytest.mark.slow
@pytest.mark.skipif(not MIRROR.is_file(), reason="IMDB mirror not found: set FTSEARCH_DATA_DIR")
def test_minilm_fine_tunes_on_imdb_and_predicts(capsys):
    small = [
        "--n-trials", "1", "--device", "cpu",
        "--set", "data.train_size=256", "--set", "data.val_size=64", "--set", "data.test_size=64",
        "--set", "search.max_length=[128]", "--set", "search.epochs={low: 1, high: 1}",
        "--set", "search.freeze_depth={low: 4, high: 4}", "--set", "search.lr={low: 3.0e-4, high: 3.0e-4}",
        "--set", "enqueue=[]",  # the plan's first trial (4 epochs at 2e-4) is outside this small space
    ]
    assert main(["search", "imdb", *small]) == 0
    out = capsys.readouterr().out
    assert "minilm-l6 (6 blocks)" in out and "1 complete" in out
    assert main(["promote", "imdb"]) == 0
    assert main(["predict", "models:/ftsearch-imdb@champion", "A wonderful, moving film. Loved it.",
                 "Dull, clumsy and far too long. A waste of time."]) == 0
    labels = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert set(labels) <= {"negative", "positive"}
