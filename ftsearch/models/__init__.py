"""Backbone builders (text through transformers, images through timm / torchvision) and the layout
they share with the adaptation methods."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layers:
    """Where a classifier's parameters sit: ``below`` the blocks (embeddings, an image stem), the
    ``blocks`` (transformer blocks, image stages) lowest first, and the new ``head``. Parameters
    in none of them (a pooler, a final norm) sit above the blocks."""

    below: list[nn.Module]
    blocks: list[nn.Module]
    head: list[nn.Module]
