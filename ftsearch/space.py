"""The search space: the only place that calls ``trial.suggest_*``.

An Optuna trial goes in, a plain TrialConfig comes out; nothing downstream sees Optuna.
"""

from __future__ import annotations

import optuna
from pydantic import BaseModel, ConfigDict

from ftsearch.config import FloatRange, IntRange, StudyConfig
from ftsearch.generations import RETRY_OF_ATTR


class TrialConfig(BaseModel):
    """Everything one trial trains with, as sampled. Augmentations not searched keep their
    neutral default (off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str
    freeze_depth: int
    lr: float
    batch_size: int
    weight_decay: float
    epochs: int
    warmup_ratio: float
    scheduler: str = "linear"
    seed: int = 0
    # text
    max_length: int = 0
    token_mask: float = 0.0
    token_delete: float = 0.0
    # images
    crop_scale: float = 1.0
    hflip: float = 0.0
    color_jitter: float = 0.0
    auto_augment: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


def _suggest(trial: optuna.Trial, name: str, rng: FloatRange | IntRange) -> float | int:
    if isinstance(rng, IntRange):
        return trial.suggest_int(name, rng.low, rng.high)
    return trial.suggest_float(name, rng.low, rng.high, log=rng.log)


def sample_trial(trial: optuna.Trial, study: StudyConfig, blocks: dict[str, int]) -> TrialConfig:
    """Sample a TrialConfig; freeze depth is conditional on the chosen backbone's block count,
    RandAugment's settings on RandAugment being chosen."""
    space = study.search
    backbone = trial.suggest_categorical("backbone", study.backbones)
    depth_high = min(space.freeze_depth.high, blocks[backbone])
    values = {
        "backbone": backbone,
        "freeze_depth": trial.suggest_int("freeze_depth", min(space.freeze_depth.low, depth_high), depth_high),
        "lr": _suggest(trial, "lr", space.lr),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_size),
        "weight_decay": _suggest(trial, "weight_decay", space.weight_decay),
        "epochs": _suggest(trial, "epochs", space.epochs),
        "warmup_ratio": _suggest(trial, "warmup_ratio", space.warmup_ratio),
        # A retry keeps the seed of the trial it repeats (it resumes that trial's checkpoint).
        "seed": study.sampler.seed + int(trial.user_attrs.get(RETRY_OF_ATTR, trial.number)),
    }
    if space.scheduler is not None:
        values["scheduler"] = trial.suggest_categorical("scheduler", space.scheduler)
    if study.modality == "text":
        values["max_length"] = trial.suggest_categorical("max_length", space.max_length)
    augment = space.augment
    if augment.auto_augment is not None:
        values["auto_augment"] = trial.suggest_categorical("auto_augment", augment.auto_augment)
    for name in sorted(augment.used() - {"auto_augment"}):  # a fixed order keeps seeded samples stable
        if name.startswith("randaugment_") and values.get("auto_augment") != "randaugment":
            continue
        values[name] = _suggest(trial, name, getattr(augment, name))
    return TrialConfig(**values)
