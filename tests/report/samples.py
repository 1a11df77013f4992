"""What a search logs, made by hand: its best run's test figures and per-label table, and the
data checks' report on its parent run."""

from __future__ import annotations

import io


def png(colour: tuple[int, int, int]) -> bytes:
    """A real 4x4 PNG of one colour: distinct figures have distinct bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def per_label_rows(n: int) -> list[dict]:
    """A multi-label search's ``test_per_label.json``: one row per label, as the search logs it."""
    return [{"label": f"label-{i}", "precision": 0.9 - i / 100, "recall": 0.8, "f1": 0.857142 - i / 100,
             "support": 12 + i, "threshold": 0.5} for i in range(n)]



def text_data_report() -> dict:
    """A text search's ``data_report.json`` on IMDB, as ``data.dedupe: warn`` leaves it on the parent run."""
    balance = {"per_class": {"negative": 11250, "positive": 11250}, "majority": "negative", "majority_share": 0.5}
    return {
        "sizes": {"train": 22500, "val": 2500, "test": 25000},
        "duplicates": {"within_split": {"train": 79, "val": 2, "test": 199},
                       "leaked_from_earlier_splits": {"val": 16, "test": 123}, "dropped": {}},
        "class_balance": {"train": balance, "val": balance, "test": balance},
        "truncation": {"backbone": "minilm-l6", "split": "train", "tokens": {"median": 233, "p90": 620, "max": 2467},
                       "truncated_share": {"256": 0.44, "512": 0.1234}},
    }


def label_issues() -> dict:
    """A text search's ``label_issues.json``: 2 of the 103 likely label errors listed, one with markup."""
    return {"method": "confident learning (cleanlab), 5-fold logistic regression", "checked": 1600, "found": 103,
            "agreement": 0.8431,
            "rows": [{"index": 997, "given": "negative", "suggested": "positive", "quality": 0.1342,
                      "text": "this is a great movie."},
                     {"index": 12, "given": "positive", "suggested": "negative", "quality": 0.2,
                      "text": "<b>awful</b>"}]}


def image_data_report() -> dict:
    """An image search's ``data_report.json``: no duplicates or token lengths, skipped files counted."""
    balance = {"per_class": {"ants": 124, "bees": 121}, "majority": "ants", "majority_share": 0.5061}
    return {"sizes": {"train": 245, "val": 153, "test": 153}, "skipped_files": 2,
            "class_balance": {"train": balance, "val": balance, "test": balance}}
