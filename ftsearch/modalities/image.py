"""Images: checks the image folders and backbones, builds each trial's model and loaders."""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, default_collate

from ftsearch.adaptation import adapt, check_lora_targets
from ftsearch.augment import batch_mixer, image_eval_transform, image_train_transform
from ftsearch.baseline import pooled_features
from ftsearch.config import StudyConfig
from ftsearch.data.checks import LABEL_ISSUE_FIGURE, DataChecks, class_balance
from ftsearch.data.images import ImageDataset, ImageSplits, Sample, load_image_splits, loader_workers
from ftsearch.disk import writing
from ftsearch.modalities.base import (
    EVAL_BATCH_SIZE,
    BaselineMember,
    LabelCheck,
    TrialSetup,
    check_metric,
    count_params,
)
from ftsearch.models.vision import (
    build_classifier,
    classifier_head,
    load_image_classifier,
    resolve_vision_backbone,
    save_image_classifier,
)
from ftsearch.predictor import ImagePredictor
from ftsearch.problems.base import Evaluation, ProblemType
from ftsearch.space import TrialConfig, searched_lora_targets
from ftsearch.train import evaluate

ENTRY_FILE = Path(__file__).resolve().parent.parent / "pyfunc_entry_image.py"
BASELINE_FIT = {"inverse_regularisation": 1.0, "max_iter": 5000}
PROBE_FOLDER = "linear-probe"  # the baseline's model folder, in the checkpoints and in a blend's folder
GRID_IMAGES = 36  # in a figure of images (misclassified, likely label errors): 6 rows of 6


class _BatchCollator:
    """Stacks a batch into ``pixel_values`` / ``labels``, mixing it (MixUp / CutMix) when asked."""

    def __init__(self, mixer=None):
        self.mixer = mixer

    def __call__(self, batch):
        images, labels = default_collate(batch)
        if self.mixer is not None:
            images, labels = self.mixer(images, labels)
        return {"pixel_values": images, "labels": labels}


class ImageModality:
    """Everything the search needs that depends on the data being images."""

    entry_file = ENTRY_FILE

    @property
    def baseline_name(self) -> str:
        return f"linear probe on frozen {self.config.backbones[0]} features"

    def __init__(self, config: StudyConfig, device: torch.device):
        """Scan and check the image folders and resolve the backbones; raises FtsearchError."""
        self.config, self.device, self.problem = config, device, config.problem
        self.splits: ImageSplits = load_image_splits(config.data, Path(config.source).parent)
        self.labels = self.splits.labels
        check_metric(config, self.labels)
        self.backbones = {name: resolve_vision_backbone(name) for name in config.backbones}
        self.blocks = {name: b.num_blocks for name, b in self.backbones.items()}
        if "lora" in config.search.method:
            for name, backbone in self.backbones.items():
                check_lora_targets(build_classifier(backbone, 2), searched_lora_targets(config), name, config.source)
        self.checks = self._check_data()

    def describe(self) -> str:
        names = ", ".join(f"{b.name} ({b.num_blocks} stages, {b.preprocessing['input_size'][-1]} px)" for b in self.backbones.values())
        skipped = f"; skipped {len(self.splits.skipped)} unusable file(s)" if self.splits.skipped else ""
        lines = [f"data: {self.splits.sizes()}, classes {', '.join(self.labels)}{skipped}; backbones: {names}"]
        lines += [f"  skipped {s['path']}: {s['reason']}" for s in self.splits.skipped]
        return "\n".join(lines)

    @cached_property
    def _baseline_features(self) -> dict[str, tuple]:
        backbone = self.backbones[self.config.backbones[0]]
        transform = image_eval_transform(backbone.preprocessing)
        loaders = {
            split: self._loader(getattr(self.splits, split), transform, EVAL_BATCH_SIZE)
            for split in ("train", "val", "test")
        }
        return pooled_features(build_classifier(backbone, self.problem.head_size(self.labels)).backbone, loaders)

    def baseline(self) -> dict[str, float]:
        return self.problem.baseline(self._baseline_features, **BASELINE_FIT)

    def baseline_member(self, folder: Path) -> BaselineMember:
        """The linear probe as one image model folder under ``folder``: the frozen backbone with
        the probe's estimator, refitted on train, as its head (``ProblemType.baseline_head``).
        Its outputs are the saved folder's own, run as a trial's model is (validation timed)."""
        backbone = self.backbones[self.config.backbones[0]]
        n_outputs = self.problem.head_size(self.labels)
        estimator = self.problem.fit_baseline(*self._baseline_features["train"], **BASELINE_FIT)
        weight, bias = self.problem.baseline_head(estimator, n_outputs)
        model = build_classifier(backbone, n_outputs)
        head, _ = classifier_head(model.backbone)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight))
            head.bias.copy_(torch.from_numpy(bias))
        path = folder / PROBE_FOLDER
        with writing(path):
            save_image_classifier(model, backbone, path, self.labels, self.problem.meta())
        outputs, seconds = {}, 0.0
        for split in ("val", "test"):
            probe, loader = self.eval_setup(path, split)
            start = time.perf_counter()
            outputs[split] = evaluate(probe.to(self.device), loader, self.device, self.problem).outputs
            if split == "val":
                seconds = (time.perf_counter() - start) / max(1, len(outputs[split]))
        return BaselineMember(outputs, path, seconds)

    def label_issues(self) -> LabelCheck | None:
        """Rows name each image by its path under the data set's folder, and ``label_issues.png``
        shows them titled "given -> suggested"."""
        found = self.problem.label_issues(*self._baseline_features["train"], self.labels, **BASELINE_FIT)
        if found is None:
            return None
        index = {name: i for i, name in enumerate(self.labels)}
        shown = [(self.splits.train[row["index"]][0], index[row["given"]], index[row["suggested"]])
                 for row in found.rows]
        rows = [{**row, "path": _relative(path, self.splits.root)}
                for row, (path, _, _) in zip(found.rows, shown, strict=True)]
        figures = {LABEL_ISSUE_FIGURE: image_grid(shown[:GRID_IMAGES], self.labels)} if shown else {}
        return LabelCheck({**found.as_dict(), "rows": rows}, figures)

    def parent_artifacts(self) -> dict[str, object]:
        skipped = {"skipped_files.json": self.splits.skipped} if self.splits.skipped else {}
        return {"data_report.json": self.checks.report, **skipped}

    def _check_data(self) -> DataChecks:
        splits = {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}
        targets = {split: np.array([label for _, label in samples], dtype=np.int64) for split, samples in splits.items()}
        checks = DataChecks({"sizes": {split: len(samples) for split, samples in splits.items()},
                             "digests": self.splits.digests,
                             "sources": {split: self.config.data.dataset for split in splits},
                             "skipped_files": len(self.splits.skipped),
                             "modes": self.splits.modes, "image_sizes": self.splits.image_sizes})
        if self.splits.duplicates is not None:
            checks.report["duplicates"] = self.splits.duplicates.as_dict()
            checks.warnings += self.splits.duplicates.lines()
        checks.report["class_balance"], warnings = class_balance(targets, self.labels, self.config.metric)
        checks.warnings += warnings
        smallest, median, largest = (f"{w}x{h}" for w, h in self.splits.image_sizes.values())
        checks.notes.append(f"image sizes: smallest {smallest}, median {median}, largest {largest}")
        # PIL converts every mode to RGB for the backbone: say so when the data is not RGB already.
        converted = {mode: n for mode, n in self.splits.modes.items() if mode != "RGB"}
        if converted:
            modes = ", ".join(f"{n} {mode}" for mode, n in sorted(converted.items()))
            checks.notes.append(f"images converted to RGB: {modes} (L: grayscale, P: palette, RGBA: with alpha)")
        return checks

    def build(self, trial: TrialConfig) -> TrialSetup:
        """The trial's classifier, adapted (``ftsearch.adaptation``), and its loaders."""
        backbone = self.backbones[trial.backbone]
        train = self._loader(
            self.splits.train, image_train_transform(trial, backbone.preprocessing), trial.batch_size,
            shuffle=True, seed=trial.seed, collate=_BatchCollator(batch_mixer(trial, len(self.labels))),
        )
        val = self._loader(self.splits.val, image_eval_transform(backbone.preprocessing), EVAL_BATCH_SIZE)
        model = build_classifier(backbone, self.problem.head_size(self.labels))
        return TrialSetup(model, train, val, adapt(model, trial), count_params(model))

    def save(self, model: torch.nn.Module, trial: TrialConfig, folder: Path, problem: ProblemType) -> None:
        with writing(folder):
            save_image_classifier(model, self.backbones[trial.backbone], folder, self.labels, problem.meta())

    def eval_setup(self, folder: Path, split: str) -> tuple[torch.nn.Module, DataLoader]:
        model, meta = load_image_classifier(folder)
        return model, self._loader(getattr(self.splits, split), image_eval_transform(meta["preprocessing"]), EVAL_BATCH_SIZE)

    def served(self, folder: Path, device: str) -> tuple[ImagePredictor, tuple[list[str]]]:
        return ImagePredictor(folder, device), ([path for path, _ in self.splits.val],)

    def input_example(self) -> pd.DataFrame:
        return pd.DataFrame({"path": [path for path, _ in self.splits.test[:2]]})

    def input_schema(self):
        from mlflow.types import ColSpec, Schema

        return Schema([ColSpec("string", "path")])

    def example_figures(self, evaluation: Evaluation) -> dict[str, object]:
        """A grid of the validation images the best epoch got wrong, with true and predicted labels."""
        wrong = [(self.splits.val[i][0], t, p) for i, t, p in self.problem.mistakes(evaluation)]
        return {"misclassified.png": image_grid(wrong[:GRID_IMAGES], self.labels)} if wrong else {}

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


def _relative(path: str, root: Path | None) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve())) if root is not None else str(path)
    except ValueError:  # a file outside the data set's folder
        return str(path)


def image_grid(items: list[tuple[str, int, int]], labels: tuple[str, ...]):
    """A matplotlib grid of (image path, true label, predicted label), titled "true -> predicted"."""
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = min(6, len(items))
    rows = -(-len(items) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for ax, (image_path, truth, predicted) in zip(axes.flat, items, strict=False):
            with Image.open(image_path) as image:
                image.thumbnail((256, 256))
                ax.imshow(image.convert("RGB"))
            ax.set_title(f"{labels[truth]} -> {labels[predicted]}", fontsize=8)
        figure.tight_layout()
    except BaseException:
        plt.close(figure)
        raise
    return figure
