"""Image classification: checks the image folders and backbones, builds each trial's model and loaders."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, default_collate

from ftsearch.augment import batch_mixer, image_eval_transform, image_train_transform
from ftsearch.baseline import linear_probe
from ftsearch.config import StudyConfig
from ftsearch.data.images import ImageDataset, ImageSplits, Sample, load_image_splits, loader_workers
from ftsearch.models.vision import (
    build_classifier,
    load_image_classifier,
    resolve_vision_backbone,
    save_image_classifier,
)
from ftsearch.space import TrialConfig
from ftsearch.tasks.base import EVAL_BATCH_SIZE, TrialSetup, count_params

ENTRY_FILE = Path(__file__).resolve().parent.parent / "pyfunc_entry_image.py"


class _BatchCollator:
    """Stacks a batch into ``pixel_values`` / ``labels``, mixing it (MixUp / CutMix) when asked."""

    def __init__(self, mixer=None):
        self.mixer = mixer

    def __call__(self, batch):
        images, labels = default_collate(batch)
        if self.mixer is not None:
            images, labels = self.mixer(images, labels)
        return {"pixel_values": images, "labels": labels}


class ImageTask:
    """Everything the search needs that depends on the data being images."""

    entry_file = ENTRY_FILE

    @property
    def baseline_name(self) -> str:
        return f"linear probe on frozen {self.config.backbones[0]} features"

    def __init__(self, config: StudyConfig, device: torch.device):
        """Scan and check the image folders and resolve the backbones; raises FtsearchError."""
        self.config, self.device = config, device
        self.splits: ImageSplits = load_image_splits(config.data, Path(config.source).parent)
        self.labels = self.splits.labels
        self.backbones = {name: resolve_vision_backbone(name) for name in config.backbones}
        self.blocks = {name: b.num_blocks for name, b in self.backbones.items()}

    def describe(self) -> str:
        names = ", ".join(f"{b.name} ({b.num_blocks} stages, {b.preprocessing['input_size'][-1]} px)" for b in self.backbones.values())
        skipped = f"; skipped {len(self.splits.skipped)} unusable file(s)" if self.splits.skipped else ""
        lines = [f"data: {self.splits.sizes()}, classes {', '.join(self.labels)}{skipped}; backbones: {names}"]
        lines += [f"  skipped {s['path']}: {s['reason']}" for s in self.splits.skipped]
        return "\n".join(lines)

    def baseline(self) -> dict[str, float]:
        backbone = self.backbones[self.config.backbones[0]]
        transform = image_eval_transform(backbone.preprocessing)
        loaders = {
            split: self._loader(getattr(self.splits, split), transform, EVAL_BATCH_SIZE)
            for split in ("train", "val", "test")
        }
        return linear_probe(build_classifier(backbone, len(self.labels)).backbone, loaders)

    def parent_artifacts(self) -> dict[str, object]:
        return {"skipped_files.json": self.splits.skipped} if self.splits.skipped else {}

    def build(self, trial: TrialConfig) -> TrialSetup:
        """The trial's classifier (stem and lowest stages frozen) and its loaders."""
        backbone = self.backbones[trial.backbone]
        train = self._loader(
            self.splits.train, image_train_transform(trial, backbone.preprocessing), trial.batch_size,
            shuffle=True, seed=trial.seed, collate=_BatchCollator(batch_mixer(trial, len(self.labels))),
        )
        val = self._loader(self.splits.val, image_eval_transform(backbone.preprocessing), EVAL_BATCH_SIZE)
        model = build_classifier(backbone, len(self.labels))
        trainable = model.freeze(trial.freeze_depth)
        return TrialSetup(model, train, val, trainable, count_params(model))

    def save(self, model: torch.nn.Module, trial: TrialConfig, folder: Path) -> None:
        save_image_classifier(model, self.backbones[trial.backbone], folder, self.labels)

    def test_setup(self, folder: Path) -> tuple[torch.nn.Module, DataLoader]:
        model, meta = load_image_classifier(folder)
        return model, self._loader(self.splits.test, image_eval_transform(meta["preprocessing"]), EVAL_BATCH_SIZE)

    def input_example(self) -> pd.DataFrame:
        return pd.DataFrame({"path": [path for path, _ in self.splits.test[:2]]})

    def log_misclassified(self, run, y_true, y_pred, path: str) -> None:
        """A grid of the validation images the best epoch got wrong, with true and predicted labels."""
        wrong = [(self.splits.val[i][0], int(t), int(p)) for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True)) if t != p]
        run.log_image_grid(wrong[:36], self.labels, path)

    def _loader(self, samples: list[Sample], transform, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                collate=None) -> DataLoader:
        workers = loader_workers()
        return DataLoader(
            ImageDataset(samples, transform),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collate or _BatchCollator(),
            num_workers=workers,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )
