"""What every task (text, images) gives the search: a model and loaders per trial, and a way to
save, test and serve the winner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch
from torch.utils.data import DataLoader

from ftsearch.space import TrialConfig

EVAL_BATCH_SIZE = 64


@dataclass
class TrialSetup:
    """A trial's model (``model(**batch)`` returns ``.loss`` and ``.logits``) and its loaders."""

    model: torch.nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    trainable_params: int
    total_params: int
    feature_cache: str = ""  # how the frozen prefix was served, for the trial's log


class Task(Protocol):
    """The modality-specific half of a search."""

    labels: tuple[str, ...]
    blocks: dict[str, int]  # backbone -> number of blocks that can be frozen
    entry_file: Path  # MLflow model code of the registered model

    def describe(self) -> str: ...

    def build(self, trial: TrialConfig) -> TrialSetup: ...

    def save(self, model: torch.nn.Module, trial: TrialConfig, folder: Path) -> None: ...

    def test_setup(self, folder: Path) -> tuple[torch.nn.Module, DataLoader]: ...

    def input_example(self) -> pd.DataFrame: ...

    def parent_artifacts(self) -> dict[str, object]: ...

    baseline_name: str

    def baseline(self) -> dict[str, float]: ...

    def log_misclassified(self, run, y_true, y_pred, path: str) -> None: ...


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
