"""Text data sets: loading (local mirror, any local file, or the hub), validation and splits.

A data set is a train file with optional validation and test files. Without a test file a test
split is held out of train first; without a validation file one is carved from what is left.
Single-label data splits stratified by class, multi-label and numeric targets randomly; every
split is seeded. The test split is only ever used to score the final model.

Targets are parsed by their kind: ``class`` (one class id), ``classes`` (multi-label: a set of
class ids, kept as a multi-hot vector) or ``number`` (regression). Every bad value is reported
with its file, row (and line, for .csv / .tsv) and column.
"""

from __future__ import annotations

import csv
import hashlib
import math
import numbers
import reprlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from ftsearch import settings
from ftsearch.catalog import TEXT_DATASETS, TextDatasetSpec
from ftsearch.config import DataConfig
from ftsearch.data.checks import Duplicates, find_duplicates, kept_rows, text_keys, unsplittable
from ftsearch.errors import FtsearchError

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
TARGET_KINDS = ("class", "classes", "number")
SHOWN_ROWS = 5  # offending rows quoted in an error; the count covers them all
# TSV has no quoting: texts keep their quote characters (GoEmotions, SICK) instead of merging lines.
_DELIMITED = {"csv": {"sep": ",", "quoting": csv.QUOTE_MINIMAL}, "tsv": {"sep": "\t", "quoting": csv.QUOTE_NONE}}
_FILE_KEYS = {"train": "dataset", "val": "val_file", "test": "test_file"}  # split -> the data.* key of its file


@dataclass(frozen=True)
class TextSplits:
    """Train, validation and test frames with columns ``text`` (str), ``text_pair`` (str, only
    when ``data.text_pair_column`` is set) and ``label``: an int64 class id, a float32 multi-hot
    vector per cell (object column), or a float, by the target kind. ``labels`` are the class
    names, ``()`` for numeric targets. ``duplicates`` is what ``data.dedupe`` found in the splits
    before subsampling (None when it is ``off``)."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    labels: tuple[str, ...]
    duplicates: Duplicates | None = None

    def sizes(self) -> str:
        return f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}"


def target_array(frame: pd.DataFrame) -> np.ndarray:
    """A split's ``label`` column as training targets: int64 ``(n,)`` class ids, float32 ``(n,)``
    numbers, or float32 ``(n, n_labels)`` multi-hot rows."""
    column = frame["label"]
    if column.dtype == object:
        return np.stack(column.to_numpy()).astype(np.float32, copy=False)
    if pd.api.types.is_float_dtype(column):
        return column.to_numpy(np.float32)
    return column.to_numpy(np.int64)


def fingerprint(frame: pd.DataFrame) -> str:
    """A short content hash of a split (texts, second texts, targets), so caches keyed by it
    notice any change of the data."""
    multi_hot = frame["label"].dtype == object
    # Multi-hot cells are arrays, which pandas cannot hash: their stacked bytes are hashed instead.
    columns = [c for c in ("text", "text_pair", "label") if c in frame.columns and not (c == "label" and multi_hot)]
    hashed = pd.util.hash_pandas_object(frame[columns], index=False).to_numpy().tobytes()
    if multi_hot:
        hashed += target_array(frame).tobytes()
    return hashlib.sha256(hashed).hexdigest()[:16]


def load_text_splits(cfg: DataConfig, study_dir: Path | None = None, target_kind: str = "class") -> TextSplits:
    """Load, validate, split and subsample the study's text data set.

    ``target_kind`` says how the label column is parsed: ``class`` (a class name or id per row),
    ``classes`` (several per row: a list, or a string split on ``data.label_separator``) or
    ``number`` (a float). Files named relatively are looked for in the working directory, then
    ``$FTSEARCH_DATA_DIR``, then ``study_dir``. Raises FtsearchError on any bad file or value.
    """
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"target_kind {target_kind!r}: use one of {', '.join(TARGET_KINDS)}")
    labels = _class_names(cfg, study_dir, target_kind)
    tables = _load_tables(cfg, study_dir)
    frames = {split: _normalise(frame, source, cfg, labels, target_kind) for split, (frame, source) in tables.items()}
    stratify, seed, origin = target_kind == "class", cfg.split_seed, tables["train"][1].name
    train = frames["train"]
    if "test" not in frames:
        # No test file: hold out a test split first, so the search never sees it.
        train, frames["test"] = _split(train, cfg.val_fraction, seed, origin, stratify)
    if "val" not in frames:
        train, frames["val"] = _split(train, cfg.val_fraction, seed, origin, stratify)
    splits, duplicates = {"train": train, "val": frames["val"], "test": frames["test"]}, None
    if cfg.dedupe != "off":
        # Before subsampling: a leak counts whether or not this plan's subsample happens to draw it,
        # and a drop leaves data.*_size rows to draw from.
        keys = {split: text_keys(frame) for split, frame in splits.items()}
        duplicates = find_duplicates(keys)
        if cfg.dedupe == "drop":
            kept = kept_rows(keys)
            duplicates.dropped = {split: int((~mask).sum()) for split, mask in kept.items()}
            splits = {split: frame[kept[split]].reset_index(drop=True) for split, frame in splits.items()}
            emptied = [split for split, frame in splits.items() if frame.empty]
            if emptied:
                raise FtsearchError(f"{origin}: data.dedupe: drop leaves no {' / '.join(emptied)} rows; "
                                    "every such row is also in an earlier split. Use data.dedupe: warn")
    return TextSplits(
        **{split: _subsample(frame, getattr(cfg, f"{split}_size"), seed, split, stratify)
           for split, frame in splits.items()},
        labels=labels,
        duplicates=duplicates,
    )


@dataclass(frozen=True)
class _Source:
    """Where a frame was read from, so that a bad value can be pointed at."""

    name: str  # "data file <path>", or "data set <hub id> (<split> split)"
    path: Path | None = None
    delimited: str | None = None  # "csv" / "tsv": its rows have line numbers
    header: bool = True

    def rows(self, positions: list[int]) -> list[str]:
        """``row N (line M)`` for 0-based positions in the frame read (rows count from 1)."""
        lines = self._lines() if self.delimited else []
        return [f"row {p + 1}" + (f" (line {lines[p]})" if p < len(lines) else "") for p in positions]

    def _lines(self) -> list[int]:
        # A quoted cell can span lines and pandas skips blank lines: a row's line must be counted.
        options = _DELIMITED[self.delimited]
        starts, previous = [], 0
        try:
            with self.path.open(newline="", encoding="utf-8", errors="replace") as handle:
                reader = csv.reader(handle, delimiter=options["sep"], quoting=options["quoting"])
                for record in reader:
                    if record:
                        starts.append(previous + 1)
                    previous = reader.line_num
        except csv.Error:  # e.g. a cell beyond the csv module's size limit: the row still locates it
            return []
        return starts[1:] if self.header else starts


def _class_names(cfg: DataConfig, study_dir: Path | None, kind: str) -> tuple[str, ...]:
    if kind == "number":
        if cfg.labels is not None or cfg.labels_file is not None:
            raise FtsearchError("data.labels / data.labels_file: a numeric target has no classes; drop them")
        return ()
    if cfg.labels is not None:
        names, origin = tuple(cfg.labels), "data.labels"
    elif cfg.labels_file is not None:
        path = _find_file(cfg.labels_file, study_dir, "labels_file")
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip())
        origin = f"labels file {path}"
    else:
        raise FtsearchError(
            "the class names are not given: set data.labels (a list, label i is labels[i]) "
            "or data.labels_file (a text file, one name a line, in id order)"
        )
    if len(names) < 2:
        raise FtsearchError(f"{origin} names {len(names)} class(es); give two or more")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise FtsearchError(f"{origin} names {', '.join(map(repr, repeated))} more than once; give each class once")
    return names


def _load_tables(cfg: DataConfig, study_dir: Path | None) -> dict[str, tuple[pd.DataFrame, _Source]]:
    """The raw frames the data set's files give, by split: always train; val and test when given."""
    spec = TEXT_DATASETS.get(cfg.dataset)
    if spec is not None:
        # A catalog data set brings its own files and splits: a file key given with it would be
        # silently unused.
        given = [f"data.{key}" for key in ("test_file", "val_file", "format", "columns") if getattr(cfg, key) is not None]
        if given:
            raise FtsearchError(f"{', '.join(given)} cannot be used with the catalog data set {cfg.dataset!r}, which "
                                "brings its own files and splits; give data.dataset as a file path to use your own")
        return _load_catalog(spec, cfg)
    tables = {}
    for split, key in _FILE_KEYS.items():
        name = getattr(cfg, key)
        if name is not None:
            path = _find_file(name, study_dir, key)
            tables[split] = _read(path, _format(path, cfg.format), cfg.columns)
    return tables


def _load_catalog(spec: TextDatasetSpec, cfg: DataConfig) -> dict[str, tuple[pd.DataFrame, _Source]]:
    folder = settings.data_dir() / spec.folder
    files = [folder / f"{split}.parquet" for split in spec.splits]
    if all(f.is_file() for f in files):
        return {"train": _read(files[0], "parquet", None), "test": _read(files[1], "parquet", None)}
    frames = _load_from_hub(spec.hub_id, spec.splits, folder, cfg)
    return {
        ours: (frame, _Source(f"data set {spec.hub_id} ({theirs} split)"))
        for ours, theirs, frame in zip(("train", "test"), spec.splits, frames)
    }


def _find_file(name: str, study_dir: Path | None, key: str) -> Path:
    candidates = [Path(name), settings.data_dir() / name]
    if study_dir is not None:
        candidates.append(study_dir / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    what = (
        f"data set {name!r} is neither a catalog name ({', '.join(TEXT_DATASETS)}) nor a file"
        if key == "dataset"
        else f"data.{key} {name!r} is not a file"
    )
    raise FtsearchError(
        f"{what}; looked for {', '.join(str(c) for c in candidates)}. "
        f"Set {settings.DATA_DIR_ENV} to the folder holding it, or give a path in the study file."
    )


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A table file (.csv, .tsv, .jsonl, .json, .parquet, by its suffix) read as a study's data
    files are: texts kept exactly as written; ``columns`` names those of a .csv / .tsv file without
    a header row. Raises FtsearchError saying what is wrong."""
    if not path.is_file():
        raise FtsearchError(f"{path} is not a file")
    return _read(path, _format(path, None), columns)[0]


def _format(path: Path, given: str | None) -> str:
    if given is not None:
        return given
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise FtsearchError(
            f"data file {path}: unsupported format {path.suffix!r}; use one of "
            f"{', '.join('.' + f for f in FORMATS)}, or set data.format ({' / '.join(FORMATS)}) to read it as one"
        )
    return fmt


def _read(path: Path, fmt: str, columns: list[str] | None) -> tuple[pd.DataFrame, _Source]:
    if columns is not None and fmt not in _DELIMITED:
        raise FtsearchError(
            f"data file {path}: data.columns names the columns of .csv / .tsv files without a header row; "
            f"a {fmt} file names its own, drop data.columns"
        )
    if path.stat().st_size == 0:
        raise FtsearchError(f"data file {path} is empty")
    try:
        if fmt in _DELIMITED:
            # keep_default_na=False: a text "NA" or "null" stays text; str: a text "007" stays "007".
            header = None if columns else 0
            frame = pd.read_csv(path, **_DELIMITED[fmt], header=header, keep_default_na=False, dtype=str)
        elif fmt == "parquet":
            frame = pd.read_parquet(path)
        else:
            # dtype=False: pandas would otherwise turn texts such as "007" into numbers.
            frame = pd.read_json(path, lines=fmt == "jsonl", dtype=False)
    except Exception as err:  # noqa: BLE001 - any parser error becomes one clear message
        raise FtsearchError(f"data file {path} cannot be read as {fmt}: {err}") from None
    if columns is not None:
        if frame.shape[1] != len(columns) or len(set(columns)) != len(columns):
            raise FtsearchError(
                f"data file {path} has {frame.shape[1]} columns, data.columns names {len(columns)} "
                f"({', '.join(columns)}); give each column one distinct name, in order"
            )
        frame.columns = columns
    delimited = fmt if fmt in _DELIMITED else None
    return frame, _Source(f"data file {path}", path, delimited, header=columns is None)


def _load_from_hub(
    hub_id: str, splits: tuple[str, str], folder: Path, cfg: DataConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    hint = (
        f"put {', '.join(f'{s}.parquet' for s in splits)} (columns {cfg.text_column}, "
        f"{cfg.label_column}) in {folder}, or set {settings.DATA_DIR_ENV} to the folder that holds "
        f"{folder.name}/"
    )
    try:
        import datasets
    except ImportError:
        raise FtsearchError(f"{folder} has no local copy and `datasets` is not installed: {hint}") from None
    try:
        loaded = datasets.load_dataset(hub_id)
        return tuple(loaded[split].to_pandas() for split in splits)  # type: ignore[return-value]
    except Exception as err:  # noqa: BLE001 - offline, missing, or renamed on the hub
        raise FtsearchError(
            f"no local copy in {folder} and the hub data set {hub_id!r} could not be loaded "
            f"({type(err).__name__}: {str(err)[:200]}): {hint}"
        ) from None


def _normalise(
    frame: pd.DataFrame, source: _Source, cfg: DataConfig, labels: tuple[str, ...], kind: str
) -> pd.DataFrame:
    keys = {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column, "label_column": cfg.label_column}
    missing = {key: column for key, column in keys.items() if column is not None and column not in frame.columns}
    if missing:
        # A header-less file read as if it had one names its columns after its first row.
        hint = " (or data.columns, for a file without a header row)" if source.delimited and source.header else ""
        raise FtsearchError(
            f"{source.name}: column(s) {', '.join(missing.values())} not found; it has "
            f"{', '.join(map(str, frame.columns))}. Set {' / '.join(f'data.{key}' for key in missing)}{hint}."
        )
    if frame.empty:
        raise FtsearchError(f"{source.name} has no rows")
    columns = {"text": _texts(frame, cfg.text_column, source)}
    if cfg.text_pair_column is not None:
        columns["text_pair"] = _texts(frame, cfg.text_pair_column, source)
    columns["label"] = _targets(frame, source, cfg, labels, kind)
    return pd.DataFrame(columns)


def _texts(frame: pd.DataFrame, column: str, source: _Source) -> np.ndarray:
    texts = frame[column]
    empty = texts.isna() | texts.astype(str).str.strip().eq("")
    _reject(source, np.flatnonzero(empty.to_numpy()).tolist(), texts.tolist(),
            f"empty text(s) in column {column!r}", "remove or fill them")
    return texts.astype(str).to_numpy()


def _targets(
    frame: pd.DataFrame, source: _Source, cfg: DataConfig, labels: tuple[str, ...], kind: str
) -> np.ndarray | pd.Series:
    values, column = frame[cfg.label_column].tolist(), cfg.label_column
    names = {name: i for i, name in enumerate(labels)}
    declared = f"the declared classes {list(labels)} (or their indices 0..{len(labels) - 1})"
    fix = "fix the data or the class names (data.labels / data.labels_file)"
    if kind == "number":
        parsed = [_number(value) for value in values]
        problem, fix = f"value(s) in column {column!r} are not numbers", "fix the data or data.label_column"
    elif kind == "class":
        parsed = [_label_id(value, names) for value in values]
        problem = f"label(s) in column {column!r} are not among {declared}"
    else:
        parsed = [_label_set(value, names, cfg.label_separator) for value in values]
        problem = f"cell(s) in column {column!r} hold labels not among {declared}"
        if cfg.label_separator is None:
            fix += ", or set data.label_separator if a string cell lists several"
    _reject(source, [i for i, target in enumerate(parsed) if target is None], values, problem, fix)
    if kind == "number":
        return np.asarray(parsed, dtype=np.float64)
    if kind == "class":
        return np.asarray(parsed, dtype=np.int64)
    return pd.Series([_multi_hot(ids, len(labels)) for ids in parsed], dtype=object)


def _label_id(value: object, names: dict[str, int]) -> int | None:
    """A class name, or a class id: an integer, or a string of digits that is not itself a name."""
    if isinstance(value, str):
        stripped = value.strip()
        found = names.get(value, names.get(stripped))
        if found is None and stripped.isascii() and stripped.isdigit():
            found = int(stripped)
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and float(value).is_integer():
        found = int(value)
    else:
        return None
    return found if found is not None and 0 <= found < len(names) else None


def _label_set(value: object, names: dict[str, int], separator: str | None) -> set[int] | None:
    """The class ids of a multi-label cell (a list / array, a string split on ``separator``, or
    one id); None when any is unknown. An empty list or string is an example with no label."""
    if isinstance(value, str):
        parts = [part for part in (value.split(separator) if separator else [value]) if part.strip()]
    elif isinstance(value, (list, tuple, np.ndarray)):
        parts = list(value)
    else:
        parts = [value]
    ids = {_label_id(part, names) for part in parts}
    return None if None in ids else ids  # type: ignore[return-value]


def _multi_hot(ids: set[int], size: int) -> np.ndarray:
    vector = np.zeros(size, dtype=np.float32)
    vector[sorted(ids)] = 1.0
    return vector


def _number(value: object) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _reject(source: _Source, bad: list[int], values: list, problem: str, fix: str) -> None:
    """Raise FtsearchError for the rows at 0-based positions ``bad``, if any: the first few, each
    with its row, line and value, and how many there are."""
    if not bad:
        return
    shown = ", ".join(f"{where} {reprlib.repr(values[p])}" for where, p in zip(source.rows(bad[:SHOWN_ROWS]), bad))
    more = f", ... ({len(bad)} in all)" if len(bad) > SHOWN_ROWS else ""
    raise FtsearchError(f"{source.name}: {len(bad)} {problem}: {shown}{more}; {fix}")


def _split(
    frame: pd.DataFrame, fraction: float, seed: int, origin: str, stratify: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    try:
        kept, held = train_test_split(
            frame, test_size=fraction, random_state=seed, stratify=frame["label"] if stratify else None
        )
    except ValueError as err:
        raise FtsearchError(
            f"{origin}: cannot carve a {'stratified ' if stratify else ''}{fraction:.0%} split from "
            f"{len(frame)} rows ({unsplittable(err, frame['label'] if stratify else [])}); add data or change "
            "data.val_fraction"
        ) from None
    return kept.reset_index(drop=True), held.reset_index(drop=True)


def _subsample(frame: pd.DataFrame, size: int | None, seed: int, name: str, stratify: bool) -> pd.DataFrame:
    if size is None or size >= len(frame):
        return frame
    try:
        kept, _ = train_test_split(
            frame, train_size=size, random_state=seed, stratify=frame["label"] if stratify else None
        )
    except ValueError as err:
        raise FtsearchError(
            f"data.{name}_size {size}: cannot draw a {'stratified ' if stratify else ''}subsample of "
            f"{len(frame)} rows ({unsplittable(err, frame['label'] if stratify else [])}); choose another "
            f"data.{name}_size or null for all"
        ) from None
    return kept.reset_index(drop=True)
