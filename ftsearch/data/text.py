"""Text data sets: loading (local mirror, any local file, or the hub), validation and splits.

The validation split is carved from train, stratified and seeded; the test split is only ever
used to score the final model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from ftsearch import settings
from ftsearch.catalog import TEXT_DATASETS
from ftsearch.config import DataConfig
from ftsearch.errors import FtsearchError

SUFFIX_READERS = {
    ".csv": pd.read_csv,
    ".parquet": pd.read_parquet,
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": pd.read_json,
}


@dataclass(frozen=True)
class TextSplits:
    """Train, validation and test frames with columns ``text`` (str) and ``label`` (int)."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    labels: tuple[str, ...]

    def sizes(self) -> str:
        return f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}"


def fingerprint(frame: pd.DataFrame) -> str:
    """A short content hash of a split, so caches keyed by it notice any change of the data."""
    hashed = pd.util.hash_pandas_object(frame[["text", "label"]], index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]


def load_text_splits(cfg: DataConfig, study_dir: Path | None = None) -> TextSplits:
    """Load, validate, split and subsample the study's text data set."""
    train_raw, test_raw, origin = _load_raw(cfg, study_dir)
    labels = tuple(cfg.labels)
    train = _normalise(train_raw, cfg, origin)
    test = _normalise(test_raw, cfg, origin) if test_raw is not None else None
    if test is None:
        # A single file: hold out a test split first, so the search never sees it.
        train, test = _stratified_split(train, cfg.val_fraction, cfg.split_seed, origin)
    train, val = _stratified_split(train, cfg.val_fraction, cfg.split_seed, origin)
    return TextSplits(
        train=_subsample(train, cfg.train_size, cfg.split_seed, "train"),
        val=_subsample(val, cfg.val_size, cfg.split_seed, "val"),
        test=_subsample(test, cfg.test_size, cfg.split_seed, "test"),
        labels=labels,
    )


def _load_raw(cfg: DataConfig, study_dir: Path | None) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    spec = TEXT_DATASETS.get(cfg.dataset)
    if spec is not None:
        folder = settings.data_dir() / spec.folder
        files = [folder / f"{split}.parquet" for split in spec.splits]
        if all(f.is_file() for f in files):
            return _read(files[0]), _read(files[1]), str(folder)
        return (*_load_from_hub(spec.hub_id, spec.splits, folder, cfg), spec.hub_id)
    path = _find_file(cfg.dataset, study_dir)
    test = _read(_find_file(cfg.test_file, study_dir)) if cfg.test_file else None
    return _read(path), test, str(path)


def _find_file(name: str, study_dir: Path | None) -> Path:
    candidates = [Path(name), settings.data_dir() / name]
    if study_dir is not None:
        candidates.append(study_dir / name)
    for candidate in candidates:
        if candidate.is_file():
            if candidate.suffix not in SUFFIX_READERS:
                raise FtsearchError(
                    f"data file {candidate}: unsupported format {candidate.suffix!r}; "
                    f"use one of {', '.join(SUFFIX_READERS)}"
                )
            return candidate
    raise FtsearchError(
        f"data set {name!r} is neither a catalog name ({', '.join(TEXT_DATASETS)}) nor a file; "
        f"looked for {', '.join(str(c) for c in candidates)}. "
        f"Set {settings.DATA_DIR_ENV} to the folder holding it, or give a path in the study file."
    )


def _read(path: Path) -> pd.DataFrame:
    try:
        return SUFFIX_READERS[path.suffix](path)
    except Exception as err:  # noqa: BLE001 - any parser error becomes one clear message
        raise FtsearchError(f"data file {path} cannot be read as {path.suffix}: {err}") from None


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


def _normalise(frame: pd.DataFrame, cfg: DataConfig, origin: str) -> pd.DataFrame:
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in frame.columns]
    if missing:
        raise FtsearchError(
            f"data set {origin}: column(s) {', '.join(missing)} not found; it has "
            f"{', '.join(map(str, frame.columns))}. Set data.text_column / data.label_column."
        )
    if frame.empty:
        raise FtsearchError(f"data set {origin} has no rows")
    texts = frame[cfg.text_column]
    empty = texts.isna() | texts.astype(str).str.strip().eq("")
    if empty.any():
        rows = ", ".join(map(str, frame.index[empty][:5]))
        raise FtsearchError(
            f"data set {origin}: {int(empty.sum())} empty text(s) in column {cfg.text_column!r} "
            f"(rows {rows}...); remove or fill them"
        )
    return pd.DataFrame(
        {"text": texts.astype(str).to_numpy(), "label": _label_ids(frame[cfg.label_column], cfg, origin)}
    )


def _label_ids(column: pd.Series, cfg: DataConfig, origin: str) -> list[int]:
    """Labels may be given as class indices or as class names from ``data.labels``."""
    names = {name: i for i, name in enumerate(cfg.labels)}
    ids, bad = [], set()
    for value in column.tolist():
        if isinstance(value, str) and value in names:
            ids.append(names[value])
        elif not isinstance(value, (bool, str)) and pd.notna(value) and float(value).is_integer() and 0 <= int(value) < len(names):
            ids.append(int(value))
        else:
            bad.add(value)
    if bad:
        shown = ", ".join(repr(v) for v in sorted(bad, key=str)[:5])
        raise FtsearchError(
            f"data set {origin}: label(s) {shown} in column {cfg.label_column!r} are not among the "
            f"declared classes {list(cfg.labels)} (or their indices 0..{len(names) - 1}); "
            "fix the data or data.labels"
        )
    return ids


def _stratified_split(
    frame: pd.DataFrame, fraction: float, seed: int, origin: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    try:
        kept, held = train_test_split(frame, test_size=fraction, random_state=seed, stratify=frame["label"])
    except ValueError as err:
        raise FtsearchError(
            f"data set {origin}: cannot carve a stratified {fraction:.0%} split from {len(frame)} rows "
            f"({err}); add data or change data.val_fraction"
        ) from None
    return kept.reset_index(drop=True), held.reset_index(drop=True)


def _subsample(frame: pd.DataFrame, size: int | None, seed: int, name: str) -> pd.DataFrame:
    if size is None or size >= len(frame):
        return frame
    try:
        kept, _ = train_test_split(frame, train_size=size, random_state=seed, stratify=frame["label"])
    except ValueError as err:
        raise FtsearchError(
            f"data.{name}_size {size}: cannot draw a stratified subsample of {len(frame)} rows ({err}); "
            f"choose another data.{name}_size or null for all"
        ) from None
    return kept.reset_index(drop=True)
