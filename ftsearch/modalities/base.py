"""What every modality (text, images) gives the search: data and backbones checked up front, a
model and loaders per trial, and a way to save, test and serve the winner.

The modality is one axis of a study's ``task:``; the problem type (``ftsearch.problems``), the
other, says what the model predicts and how it is judged. A modality asks its problem type for
the head size, the baseline's estimator and the served outputs, and never branches on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ftsearch.adaptation import Adapted
from ftsearch.data.checks import DataChecks
from ftsearch.errors import FtsearchError
from ftsearch.problems import ProblemType
from ftsearch.problems.base import Evaluation
from ftsearch.space import TrialConfig

EVAL_BATCH_SIZE = 64


@dataclass
class TrialSetup:
    """A trial's model (``model(**batch).logits``; the batch's ``labels`` are the targets), its
    loaders, and how it was adapted (``ftsearch.adaptation``): its parameter groups for the
    training loop, and what turns the trained model into the plain one to save."""

    model: torch.nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    adapted: Adapted
    total_params: int
    feature_cache: str = ""  # how the frozen prefix was served, for the trial's log

    @property
    def trainable_params(self) -> int:
        return self.adapted.trainable

    def serving_model(self) -> torch.nn.Module:
        """The trained model as a plain classifier (adapters merged, no cache wrapper)."""
        return self.adapted.serving(self.model)


@dataclass
class BaselineMember:
    """The fitted baseline, for a blend: its head-like outputs per split and where it is saved (a
    file or a model folder, copied into a blend's folder under its name, which the ensemble's
    predictor loads it by)."""

    outputs: dict[str, np.ndarray]
    path: Path
    seconds_per_example: float  # measured on validation, features included


@dataclass
class LabelCheck:
    """``ProblemType.label_issues`` as JSON (``label_issues.json``), each row with its example
    (``text`` / ``text_pair``, or an image's ``path``), and figures of them by artifact name."""

    report: dict
    figures: dict[str, object]

    def lines(self, shown: int = 3) -> list[str]:
        """For the terminal: how many, by what, and the ``shown`` worst with their examples."""
        report = self.report
        agreement = report.get("agreement")
        # A weak estimator disagrees with many right labels: its count is read with its agreement.
        fit = f"; it agrees with {agreement:.0%} of the given labels" if agreement is not None else ""
        lines = [(f"likely label errors: {report['found']} of {report['checked']} train examples "
                  f"({report['method']}{fit}); informational, nothing dropped")]
        for row in report["rows"][:shown]:
            example = row.get("path") or row.get("text", "")
            lines.append(f"  train example {row['index']}: given {row['given']!r}, looks {row['suggested']!r} "
                         f"(quality {row['quality']:.3f}): {example[:100]}")
        return lines


class Modality(Protocol):
    """The modality-specific half of a search."""

    problem: ProblemType  # fitted to the training split (``ProblemType.fitted``)
    labels: tuple[str, ...]
    blocks: dict[str, int]  # backbone -> number of blocks that can be frozen
    entry_file: Path  # MLflow model code of the registered model
    baseline_name: str
    checks: DataChecks  # what the data checks found, before any trial

    def describe(self) -> str:
        """One or more lines on the data and backbones, printed before the search."""

    def build(self, trial: TrialConfig) -> TrialSetup:
        """The trial's adapted model and its train / validation loaders."""

    def save(self, model: torch.nn.Module, trial: TrialConfig, folder: Path, problem: ProblemType) -> None:
        """Save the trained ``model`` (a plain classifier: ``TrialSetup.serving_model()``) as a
        servable folder (no pickle), with ``problem`` (the study's problem type as tuned on
        validation: thresholds, target scale) in its metadata. A full disk raises ``DiskFull``."""

    def eval_setup(self, folder: Path, split: str) -> tuple[torch.nn.Module, DataLoader]:
        """A saved model and a loader over ``split`` (``val``, ``test``), prepared as it was trained."""

    def baseline_member(self, folder: Path) -> BaselineMember:
        """The classical baseline as a member of a blend, saved in ``folder``, with its outputs on
        val and test. A full disk raises ``DiskFull``."""

    def served(self, folder: Path, device: str):
        """The saved model's predictor on ``device`` (``ftsearch.predictor``) and the validation
        inputs as its ``outputs`` takes them: what ``ftsearch.cost`` times."""

    def input_example(self) -> pd.DataFrame:
        """Two served inputs, for the registered model's example."""

    def input_schema(self):
        """The MLflow ``Schema`` of the served model's input columns."""

    def parent_artifacts(self) -> dict[str, object]:
        """JSON artifacts for the study's parent run (``data_report.json``, files skipped, ...)."""

    def baseline(self) -> dict[str, float]:
        """The classical baseline's ``baseline_<split>_<metric>`` scores on val and test."""

    def label_issues(self) -> LabelCheck | None:
        """Likely label errors in train by the baseline's estimator (``ProblemType.label_issues``),
        each row with its example; None when train is too small to check."""

    def example_figures(self, evaluation: Evaluation) -> dict[str, object]:
        """Figures of the examples themselves (misclassified images, ...), by artifact name."""


def check_classes(config, labels: tuple[str, ...], train_targets) -> None:
    """A single-label classifier needs train examples of two classes at least: refused before
    anything is created, not found by the baseline after the study exists. (Image folders cannot
    get here: every class folder must keep an image, ``ftsearch.data.images``.)"""
    if config.problem.target_kind != "class":
        return
    present = sorted({int(t) for t in train_targets})
    if len(present) < 2:
        only = ", ".join(repr(labels[i]) for i in present) or "none"
        raise FtsearchError(f"{config.source}: every train example has the same class ({only}, "
                            f"{len(train_targets)} rows); a classifier needs examples of two classes at least. "
                            "Check data.label_column and the train file")


def check_metric(config, labels: tuple[str, ...]) -> None:
    """The study's metric must apply to the classes the data turned out to have (``roc_auc`` needs
    two): checked once they are known, as the study file may not list them (a labels file, image
    folders)."""
    fitting = config.problem.metrics_for(len(labels) if labels else None)
    if config.metric not in fitting:
        raise FtsearchError(f"{config.source}: metric {config.metric!r} does not apply to {len(labels)} classes "
                            f"({', '.join(labels)}); use one of {', '.join(fitting)}")


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
