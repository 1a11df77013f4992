"""Tokenisation cached on disk, and batches with dynamic padding.

The cache is keyed by the tokenizer's own definition, the maximum length and the data's
fingerprint, so trials (and later studies) that share them never tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ftsearch import settings
from ftsearch.augment import TokenAugment
from ftsearch.data.text import fingerprint


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids per example (unpadded, truncated to max length) and their labels."""

    ids: list[np.ndarray]
    labels: np.ndarray


def tokenizer_key(tokenizer) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Truncation and padding are call-time state that tokenising itself changes, not identity.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{definition}".encode()).hexdigest()[:16]


def tokenize_cached(tokenizer, frame: pd.DataFrame, max_length: int, cache: Path | None = None) -> TokenizedSplit:
    """Tokenise ``frame['text']`` (truncating to ``max_length``), reusing the on-disk cache."""
    cache = cache or settings.cache_dir() / "tokens"
    path = cache / f"{tokenizer_key(tokenizer)}-{max_length}-{fingerprint(frame)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return TokenizedSplit(np.split(stored["flat"], stored["offsets"][1:-1]), stored["labels"])
    encoded = tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)["input_ids"]
    ids = [np.asarray(seq, dtype=np.int32) for seq in encoded]
    offsets = np.cumsum([0] + [len(seq) for seq in ids])
    labels = frame["label"].to_numpy(dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a unique name then renamed, so concurrent workers never read a partial file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(partial, flat=np.concatenate(ids), offsets=offsets, labels=labels)
    os.replace(partial, path)
    return TokenizedSplit(ids, labels)


class _Examples(Dataset):
    def __init__(self, split: TokenizedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.split.ids[index], int(self.split.labels[index])


class PadCollator:
    """Pads a batch to its longest sequence (dynamic padding), augmenting training examples."""

    def __init__(self, pad_id: int, augment: TokenAugment | None = None, seed: int = 0):
        self.pad_id = pad_id
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        seqs = [self.augment(ids, self.rng) if self.augment else ids for ids, _ in batch]
        width = max(len(s) for s in seqs)
        input_ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.tensor([label for _, label in batch]),
        }


def make_loader(
    split: TokenizedSplit,
    batch_size: int,
    pad_id: int,
    *,
    shuffle: bool,
    seed: int = 0,
    augment: TokenAugment | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a tokenised split; shuffling and augmentation are seeded."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        _Examples(split),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=PadCollator(pad_id, augment, seed),
        pin_memory=pin_memory,
    )
