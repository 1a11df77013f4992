"""Predicting with a registered model: a few inputs from the command line, a whole file, or a
REST endpoint (``mlflow models serve`` in this environment).

The registered model's signature says what it reads (``text``, ``text`` and ``text_pair``, or image
``path``s) and what it returns (its problem type's prediction table); nothing here branches on
the problem type.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from ftsearch import settings, tracking
from ftsearch.data.text import read_table
from ftsearch.errors import FtsearchError

FILE_BATCH_ROWS = 256  # rows per call of the model when predicting a file: progress, bounded memory


def _write_tsv(frame: pd.DataFrame, path: Path) -> None:
    # TSV has no quoting (ftsearch reads it with none): a tab or line break inside a cell would
    # shift the columns, so such a file goes to .csv / .jsonl / .parquet instead.
    text = frame.select_dtypes(include="object").astype(str)
    if any(text[c].str.contains("[\t\n\r]", regex=True).any() for c in text.columns):
        raise FtsearchError(f"--output {path}: some cells hold tabs or line breaks, which a .tsv cannot keep; "
                            "write .csv, .jsonl or .parquet")
    frame.to_csv(path, index=False, sep="\t", quoting=csv.QUOTE_NONE)


_WRITERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    ".csv": lambda frame, path: frame.to_csv(path, index=False),
    ".tsv": _write_tsv,
    ".jsonl": lambda frame, path: frame.to_json(path, orient="records", lines=True),
    ".parquet": lambda frame, path: frame.to_parquet(path, index=False),
}


class Served:
    """A registered model loaded for prediction, with the input columns its signature names."""

    def __init__(self, model_uri: str):
        tracking.client()  # points MLflow at the study's store
        try:
            self.model = mlflow.pyfunc.load_model(model_uri)
        except (MlflowException, OSError) as err:
            raise FtsearchError(
                f"cannot load model {model_uri!r}: {str(err).splitlines()[0]}. Use models:/<name>@champion "
                "after `ftsearch promote STUDY`, or models:/<name>@candidate"
            ) from None
        self.uri = model_uri
        schema = self.model.metadata.get_input_schema()
        self.inputs = schema.input_names() if schema is not None else ["text"]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The model's prediction table for ``frame`` (which has the model's input columns)."""
        if "path" in self.inputs:
            missing = [p for p in frame["path"] if not Path(p).is_file()]
            if missing:
                raise FtsearchError(f"{self.uri} classifies image files; not found: {', '.join(missing)}")
        return self.model.predict(frame[self.inputs].reset_index(drop=True))


def predict(model_uri: str, inputs: list[str] | None = None, pairs: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Predict for ``inputs`` (texts, or image paths for an image model) or for ``pairs`` of texts
    (a pair model); the registered model's signature says which it takes."""
    served = Served(model_uri)
    pair_model = "text_pair" in served.inputs
    if pair_model != bool(pairs):
        raise FtsearchError(
            f"{model_uri} reads pairs of texts: give them as --pair TEXT TEXT_PAIR" if pair_model
            else f"{model_uri} reads one {served.inputs[0]} per example, not pairs: leave out --pair"
        )
    if pairs:
        frame = pd.DataFrame(pairs, columns=["text", "text_pair"])
    else:
        frame = pd.DataFrame({served.inputs[0]: list(inputs or [])})
    return served.predict(frame)


def predict_file(model_uri: str, source: Path, target: Path, renames: dict[str, str] | None = None,
                 on_progress: Callable[[int, int], None] | None = None, columns: list[str] | None = None) -> int:
    """Predict for every row of ``source`` (.csv, .tsv, .jsonl, .parquet; ``columns`` names those
    of a file without a header row) and write its columns with the prediction columns added to
    ``target`` (by its suffix); ``renames`` maps the model's input names to the file's columns.
    Returns the rows written. Nothing is written unless every row was predicted."""
    if target.suffix not in _WRITERS:
        raise FtsearchError(f"--output {target}: unsupported format {target.suffix!r}; use one of {', '.join(_WRITERS)}")
    served = Served(model_uri)
    frame = read_table(source, columns)
    columns = {name: (renames or {}).get(name, name) for name in served.inputs}
    missing = [column for column in columns.values() if column not in frame.columns]
    if missing:
        raise FtsearchError(
            f"{source}: column(s) {', '.join(missing)} not found (it has {', '.join(map(str, frame.columns))}); "
            f"{model_uri} reads {', '.join(served.inputs)}: name the file's columns with --text-column / --pair-column"
        )
    inputs = pd.DataFrame({name: frame[column].astype(str).to_numpy() for name, column in columns.items()})
    parts = []
    for start in range(0, len(inputs), FILE_BATCH_ROWS):
        parts.append(served.predict(inputs.iloc[start : start + FILE_BATCH_ROWS]))
        if on_progress is not None:
            on_progress(min(start + FILE_BATCH_ROWS, len(inputs)), len(inputs))
    predictions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    clashing = set(predictions.columns) & set(frame.columns)
    predictions = predictions.rename(columns={c: f"predicted_{c}" for c in clashing})
    out = pd.concat([frame.reset_index(drop=True), predictions], axis=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: an interrupted run leaves no half-written predictions file.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial{target.suffix}")
    try:
        _WRITERS[target.suffix](out, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return len(out)


def model_uri(target: str) -> str:
    """The model ``ftsearch serve TARGET`` serves: ``TARGET`` itself when it is a model URI
    (``models:/...``, ``runs:/...``) or a model folder, else the ``champion`` of study ``TARGET``
    (a name under studies/ or a study file). A registered model or alias that does not exist is
    an error saying what to do."""
    from ftsearch.config import load_study
    from ftsearch.publish import CANDIDATE, CHAMPION

    if ":/" in target or Path(target).is_dir():
        uri = target
    else:
        uri = f"models:/{load_study(target).registered_model}@{CHAMPION}"
    name, at, alias = uri.removeprefix("models:/").partition("@")
    if uri.startswith("models:/") and at:
        try:
            tracking.client().get_model_version_by_alias(name, alias)
        except MlflowException:
            hint = (f"promote the candidate first (`ftsearch promote {target}`), or serve models:/{name}@{CANDIDATE}"
                    if alias == CHAMPION else f"the aliases are set by a search ({CANDIDATE}) and ftsearch promote ({CHAMPION})")
            raise FtsearchError(f"{uri}: the registered model {name!r} has no version with alias {alias!r} in "
                                f"{settings.tracking_uri()}; {hint}") from None
    return uri


def server_command(uri: str, host: str, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
    """The command line serving ``uri`` over REST, and its environment: uvicorn (from this
    environment's Python, whatever is on PATH) running ``ftsearch.rest_app``, which is MLflow's
    scoring server (what ``mlflow models serve --env-manager local`` runs) with a check of the
    inputs MLflow would cast, on the tracking store the model is registered in."""
    from mlflow.pyfunc import scoring_server

    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri(), scoring_server._SERVER_MODEL_PATH: uri,
           # No network here or on many servers: no telemetry calls.
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "uvicorn", "--host", host, "--port", str(port), "--workers", str(workers),
               "ftsearch.rest_app:app"]
    return command, env
