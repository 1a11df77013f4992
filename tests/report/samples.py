"""What a search logs on its best run's test split, made by hand: figures and a per-label table."""

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

