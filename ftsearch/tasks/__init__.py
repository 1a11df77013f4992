"""Tasks: the modality-specific half of a search (data, backbones, model building, serving)."""

from __future__ import annotations

import torch

from ftsearch.config import StudyConfig
from ftsearch.tasks.base import Task


def make_task(config: StudyConfig, device: torch.device) -> Task:
    """The task for the study's ``task`` key, with its data and backbones checked."""
    if config.task == "image-classification":
        from ftsearch.tasks.image import ImageTask

        return ImageTask(config, device)
    from ftsearch.tasks.text import TextTask

    return TextTask(config, device)
