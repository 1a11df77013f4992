"""The search space: the only place that calls ``trial.suggest_*``.

An Optuna trial goes in, a plain TrialConfig comes out; nothing downstream sees Optuna.
"""

from __future__ import annotations

import optuna
from pydantic import BaseModel, ConfigDict

from ftsearch.config import FloatRange, StudyConfig


class TrialConfig(BaseModel):
    """Everything one trial trains with, as sampled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str
    freeze_depth: int
    lr: float
    batch_size: int
    weight_decay: float
    epochs: int
    warmup_ratio: float
    max_length: int
    token_mask: float = 0.0
    token_delete: float = 0.0
    seed: int = 0


def _suggest_range(trial: optuna.Trial, name: str, rng: FloatRange | None) -> float:
    if rng is None:
        return 0.0
    return trial.suggest_float(name, rng.low, rng.high, log=rng.log)


def sample_trial(trial: optuna.Trial, study: StudyConfig, blocks: dict[str, int]) -> TrialConfig:
    """Sample a TrialConfig; freeze depth is conditional on the chosen backbone's block count."""
    space = study.search
    backbone = trial.suggest_categorical("backbone", study.backbones)
    depth_high = min(space.freeze_depth.high, blocks[backbone])
    return TrialConfig(
        backbone=backbone,
        freeze_depth=trial.suggest_int("freeze_depth", min(space.freeze_depth.low, depth_high), depth_high),
        lr=_suggest_range(trial, "lr", space.lr),
        batch_size=trial.suggest_categorical("batch_size", space.batch_size),
        weight_decay=_suggest_range(trial, "weight_decay", space.weight_decay),
        epochs=trial.suggest_int("epochs", space.epochs.low, space.epochs.high),
        warmup_ratio=_suggest_range(trial, "warmup_ratio", space.warmup_ratio),
        max_length=trial.suggest_categorical("max_length", space.max_length),
        token_mask=_suggest_range(trial, "token_mask", space.augment.token_mask),
        token_delete=_suggest_range(trial, "token_delete", space.augment.token_delete),
        seed=study.sampler.seed + trial.number,
    )
