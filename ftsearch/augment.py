"""Augmentations by name, each with a searched strength: token masking and deletion for text,
torchvision v2 transforms and batch MixUp / CutMix for images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenAugment:
    """Random token masking and deletion on one tokenised example.

    The first and last tokens ([CLS]/[SEP] or their equivalents) and any of ``special_ids`` (the
    separator between a pair's two texts) are never touched, so the model always sees a
    well-formed sequence.
    """

    mask_prob: float = 0.0
    delete_prob: float = 0.0
    mask_id: int | None = None
    special_ids: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return self.delete_prob > 0 or (self.mask_prob > 0 and self.mask_id is not None)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(ids, None, rng)[0]

    def apply(
        self, ids: np.ndarray, type_ids: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``ids`` augmented, and their token type ids (a pair's segments) kept aligned with them."""
        if not self.active or len(ids) <= 2:
            return ids, type_ids
        touchable = np.ones(len(ids), dtype=bool)
        touchable[[0, -1]] = False
        if self.special_ids:
            touchable &= ~np.isin(ids, self.special_ids)
        keep = np.ones(len(ids), dtype=bool)
        if self.delete_prob > 0:
            keep = ~(touchable & (rng.random(len(ids)) < self.delete_prob))
        out = ids.copy()
        if self.mask_prob > 0 and self.mask_id is not None:
            out[touchable & (rng.random(len(ids)) < self.mask_prob)] = self.mask_id
        return out[keep], None if type_ids is None else type_ids[keep]


def image_train_transform(trial, preprocessing: dict):
    """Training transforms for one trial, from the backbone's own preprocessing and the trial's
    sampled strengths (torchvision.transforms.v2). Augmentations at strength 0 are left out."""
    from torchvision.transforms import InterpolationMode, v2

    size = preprocessing["input_size"][-1]
    interpolation = InterpolationMode(preprocessing["interpolation"])
    if trial.crop_scale < 1.0:
        steps = [v2.RandomResizedCrop(size, scale=(trial.crop_scale, 1.0), interpolation=interpolation, antialias=True)]
    else:
        steps = _resize_and_center_crop(preprocessing)
    if trial.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(trial.hflip))
    if trial.color_jitter > 0:
        s = trial.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)))
    if trial.auto_augment == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    elif trial.auto_augment == "randaugment":
        steps.append(v2.RandAugment(trial.randaugment_ops, trial.randaugment_magnitude, interpolation=interpolation))
    steps += _to_normalised_tensor(preprocessing)
    if trial.random_erasing > 0:
        steps.append(v2.RandomErasing(trial.random_erasing))
    return v2.Compose(steps)


def image_eval_transform(preprocessing: dict):
    """Deterministic evaluation transform: resize, centre crop, normalise, as the backbone was trained."""
    from torchvision.transforms import v2

    return v2.Compose(_resize_and_center_crop(preprocessing) + _to_normalised_tensor(preprocessing))


def _resize_and_center_crop(preprocessing: dict) -> list:
    import math

    from torchvision.transforms import InterpolationMode, v2

    size = preprocessing["input_size"][-1]
    resize = math.floor(size / preprocessing.get("crop_pct", 0.875))
    interpolation = InterpolationMode(preprocessing["interpolation"])
    return [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]


def _to_normalised_tensor(preprocessing: dict) -> list:
    import torch
    from torchvision.transforms import v2

    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(preprocessing["mean"]), std=list(preprocessing["std"])),
    ]


def batch_mixer(trial, num_classes: int):
    """MixUp and/or CutMix on whole batches (soft labels), or None when both alphas are 0."""
    from torchvision.transforms import v2

    mixers = []
    if trial.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=trial.mixup_alpha, num_classes=num_classes))
    if trial.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=trial.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
