"""Image data sets in the ImageFolder layout: scanning, checking every file decodes, splits.

``train/<class>/*`` and ``val/<class>/*`` are required, ``test/<class>/*`` optional: without it the
validation folder is split in two, stratified and seeded (half for the search, half for the final
test). Files that do not decode as images are skipped and reported, never a crash mid-trial.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from ftsearch import settings
from ftsearch.catalog import IMAGE_FOLDERS
from ftsearch.config import DataConfig
from ftsearch.data.checks import Duplicates, find_duplicates, kept_rows, near_duplicate_keys, unsplittable
from ftsearch.errors import FtsearchError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

Sample = tuple[str, int]


@dataclass(frozen=True)
class ImageSplits:
    """(path, label) samples per split, the class names, and the files that were skipped."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    labels: tuple[str, ...]
    root: Path | None = None  # the data set's folder, that paths are shown relative to
    skipped: list[dict[str, str]] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)  # PIL mode (L, RGB, RGBA, P, ...) -> images kept
    image_sizes: dict[str, list[int]] = field(default_factory=dict)  # smallest / median / largest [w, h]
    duplicates: Duplicates | None = None  # what data.dedupe found, before subsampling (None: off)
    digests: dict[str, str] = field(default_factory=dict)  # split -> content hash of its files and labels

    def sizes(self) -> str:
        return f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}"


def find_image_folder(cfg: DataConfig, study_dir: Path | None) -> Path:
    """The data set's root folder: a catalog name under the data directory, or a path."""
    name = IMAGE_FOLDERS.get(cfg.dataset, cfg.dataset)
    candidates = [settings.data_dir() / name, Path(name)]
    if study_dir is not None:
        candidates.append(study_dir / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    hint = (
        f"looked for {', '.join(map(str, candidates))}. Put it there in the layout train/<class>/*.jpg, "
        f"val/<class>/*.jpg, or set {settings.DATA_DIR_ENV}"
    )
    if "/" in cfg.dataset and not Path(cfg.dataset).is_absolute():
        return _from_hub(cfg.dataset, hint)
    raise FtsearchError(f"image data set {cfg.dataset!r} not found; {hint}")


def _from_hub(hub_id: str, hint: str) -> Path:
    """A Hugging Face hub image data set, written once into the ImageFolder layout in the cache."""
    target = settings.cache_dir() / "hub-images" / hub_id.replace("/", "--")
    if (target / "train").is_dir():
        return target
    try:
        import datasets

        loaded = datasets.load_dataset(hub_id)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, missing `datasets`
        raise FtsearchError(
            f"image data set {hub_id!r} is not a local folder and could not be loaded from the hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); {hint}"
        ) from None
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted earlier download left
    for split, rows in loaded.items():
        images = [k for k, f in rows.features.items() if isinstance(f, datasets.Image)]
        labels = [(k, f.names) for k, f in rows.features.items() if isinstance(f, datasets.ClassLabel)]
        if not images or not labels:
            raise FtsearchError(f"hub data set {hub_id!r} split {split!r} has no image column with a class label")
        (image_column, (label_column, names)) = images[0], labels[0]
        folder = partial / {"validation": "val"}.get(split, split)
        for i, row in enumerate(rows):
            if row[label_column] < 0:  # unlabelled rows (e.g. a hidden test split)
                continue
            (folder / names[row[label_column]]).mkdir(parents=True, exist_ok=True)
            row[image_column].convert("RGB").save(folder / names[row[label_column]] / f"{i}.png")
    partial.rename(target)
    return target


def load_image_splits(cfg: DataConfig, study_dir: Path | None = None) -> ImageSplits:
    """Scan, check and split the image folder named in ``cfg``."""
    root = find_image_folder(cfg, study_dir)
    skipped: list[dict[str, str]] = []
    facts: dict[str, _Facts] = {}
    classes = _classes(root / "train")
    scan = lambda folder: _scan(folder, classes, skipped, facts, cfg.placeholder_share)
    train = scan(root / "train")
    val_classes = _classes(root / "val")
    if val_classes != classes:
        raise FtsearchError(
            f"{root}: the classes differ between train ({', '.join(classes)}) and val ({', '.join(val_classes)}); "
            "every split needs the same class folders"
        )
    val = scan(root / "val")
    if (root / "test").is_dir():
        if _classes(root / "test") != classes:
            raise FtsearchError(f"{root}: the classes of test/ differ from train's ({', '.join(classes)})")
        test = scan(root / "test")
    else:
        val, test = _split(val, 0.5, cfg.split_seed, root / "val")
    if cfg.labels is not None and tuple(cfg.labels) != classes:
        raise FtsearchError(
            f"{root}: data.labels {list(cfg.labels)} do not match the class folders {list(classes)} "
            "(sorted by name); fix data.labels or leave it out"
        )
    splits, duplicates = {"train": train, "val": val, "test": test}, None
    if cfg.dedupe != "off":
        keys = near_duplicate_keys({split: [facts[path].phash for path, _ in samples]
                                    for split, samples in splits.items()})
        duplicates = find_duplicates(keys)
        if cfg.dedupe == "drop":
            kept = kept_rows(keys)
            duplicates.dropped = {split: int((~mask).sum()) for split, mask in kept.items()}
            splits = {split: [s for s, keep in zip(samples, kept[split]) if keep] for split, samples in splits.items()}
            emptied = [split for split, samples in splits.items() if not samples]
            if emptied:
                raise FtsearchError(f"{root}: data.dedupe: drop leaves no {' / '.join(emptied)} images; "
                                    "every one is also in an earlier split. Use data.dedupe: warn")
    splits = {split: _subsample(samples, getattr(cfg, f"{split}_size"), cfg.split_seed, split)
              for split, samples in splits.items()}
    return ImageSplits(
        **splits,
        labels=classes,
        root=root,
        skipped=skipped,
        modes=dict(Counter(f.mode for f in facts.values())),
        image_sizes=_size_summary([f.size for f in facts.values()]),
        duplicates=duplicates,
        digests={split: _digest(samples, facts) for split, samples in splits.items()},
    )


def _digest(samples: list[Sample], facts: dict[str, _Facts]) -> str:
    """A short content hash of a split: every file's bytes and label, in order, so a replaced or
    relabelled image changes it (the folder's location does not)."""
    hashed = hashlib.sha256()
    for path, label in samples:
        hashed.update(f"{label}:".encode() + facts[path].sha256)
    return hashed.hexdigest()[:16]


@dataclass(frozen=True)
class _Facts:
    """What scanning learnt of a usable image."""

    mode: str
    size: tuple[int, int]
    phash: str  # perceptual hash: equal for a resized or recompressed copy
    sha256: bytes  # of the file's bytes


def _size_summary(sizes: list[tuple[int, int]]) -> dict[str, list[int]]:
    by_area = sorted(sizes, key=lambda wh: wh[0] * wh[1])
    return {"smallest": list(by_area[0]), "median": list(by_area[len(by_area) // 2]), "largest": list(by_area[-1])}


def _classes(folder: Path) -> tuple[str, ...]:
    if not folder.is_dir():
        raise FtsearchError(f"{folder} is missing: an image data set needs train/<class>/ and val/<class>/ folders")
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 2:
        raise FtsearchError(
            f"{folder} has {len(classes)} class folder(s); it needs one folder per class (at least 2), "
            "each holding that class's images"
        )
    return classes


def _scan(
    folder: Path, classes: tuple[str, ...], skipped: list[dict[str, str]], facts: dict[str, _Facts],
    placeholder_share: float | None,
) -> list[Sample]:
    samples = []
    for label, name in enumerate(classes):
        kept = 0
        # rglob does not follow links to folders (a link to a parent cannot loop); links to files
        # are followed wherever they point, as data sets built from links into a raw folder need.
        for path in sorted((folder / name).rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue  # hidden files and folders (.ipynb_checkpoints, .DS_Store) are not data
            if path.is_symlink() and not path.exists():
                skipped.append({"path": str(path), "reason": f"a link to a missing file ({os.readlink(path)})"})
                continue
            if not path.is_file():
                continue
            problem = _inspect(path, placeholder_share)
            if isinstance(problem, str):
                skipped.append({"path": str(path), "reason": problem})
                continue
            facts[str(path)] = problem
            samples.append((str(path), label))
            kept += 1
        if kept == 0:
            raise FtsearchError(f"{folder / name} holds no decodable images; add images or remove the folder")
    return samples


def _inspect(path: Path, placeholder_share: float | None) -> str | _Facts:
    """Why ``path`` is not a usable training image, or what it is.

    It is decoded in full, so truncated and corrupt files are caught. A picture nearly all of one
    colour is a placeholder ("image not found" graphics from scraped data sets), not a photo; the
    share, not a count of colours, decides, since a real grayscale image can have few grey levels.
    """
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file type ({path.suffix or 'no suffix'})"
    try:
        data = path.read_bytes()  # read once: decoded here and hashed for the split's digest
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that (and raises above): an image
            # that large is a decompression bomb or a scan no backbone needs, decoded in full here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            rgb = image.convert("RGB")
            rgb.load()
            if min(rgb.size) < 8:
                return f"too small ({rgb.size[0]}x{rgb.size[1]})"
            if placeholder_share is not None:
                share = _dominant_share(rgb)
                if share >= placeholder_share:
                    return f"{share:.0%} of its pixels are one colour: a placeholder graphic, not a photo"
            return _Facts(image.mode, rgb.size, str(imagehash.phash(rgb)), hashlib.sha256(data).digest())
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        return f"a decompression bomb or a huge scan ({err}); downscale it"
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        return f"{type(err).__name__}: {err}"


def _dominant_share(rgb: Image.Image) -> float:
    """The share of the pixels that have the most common colour, on a nearest-neighbour sample of
    at most 128 x 128 pixels (exact colours, so a flat area stays flat; cheap for large photos)."""
    sample = rgb.resize((min(128, rgb.width), min(128, rgb.height)), Image.Resampling.NEAREST)
    counts = sample.getcolors(sample.width * sample.height)
    return max(count for count, _ in counts) / (sample.width * sample.height)


def _split(samples: list[Sample], fraction: float, seed: int, origin: Path) -> tuple[list[Sample], list[Sample]]:
    labels = [label for _, label in samples]
    try:
        kept, held = train_test_split(samples, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as err:
        raise FtsearchError(f"{origin}: too few images to split in two per class ({unsplittable(err, labels)})") from None
    return kept, held


def _subsample(samples: list[Sample], size: int | None, seed: int, name: str) -> list[Sample]:
    if size is None or size >= len(samples):
        return samples
    try:
        kept, _ = train_test_split(samples, train_size=size, random_state=seed, stratify=[y for _, y in samples])
    except ValueError as err:
        raise FtsearchError(
            f"data.{name}_size {size}: cannot draw a stratified subsample of {len(samples)} images "
            f"({unsplittable(err, [y for _, y in samples])}); "
            f"choose another data.{name}_size or null for all"
        ) from None
    return kept


class ImageDataset(Dataset):
    """Decodes an image, applies ``transform`` and returns (tensor, label)."""

    def __init__(self, samples: list[Sample], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def loader_workers() -> int:
    """Decoding JPEGs is worth a worker process or two where there are cores to spare."""
    return min(4, max(0, (os.cpu_count() or 1) - 1))
