"""Modalities: the data-specific half of a search (data, backbones, model building, serving)."""

from __future__ import annotations

import torch

from ftsearch.config import StudyConfig
from ftsearch.modalities.base import Modality


def make_modality(config: StudyConfig, device: torch.device) -> Modality:
    """The modality of the study's ``task``, with its data and backbones checked."""
    if config.modality == "image":
        from ftsearch.modalities.image import ImageModality

        return ImageModality(config, device)
    from ftsearch.modalities.text import TextModality

    return TextModality(config, device)
