"""The frozen-prefix feature cache: hidden states after a backbone's frozen lowest blocks.

A trial that freezes the embeddings and the lowest k blocks, and does not augment its inputs,
computes the same hidden states after block k for every example in every epoch; so do all trials
that share the backbone, k and the tokenised data. They are computed once, stored in half
precision on disk (memory-mapped, so the OS keeps hot entries in memory), and the trial trains
only the blocks above k from them.

An entry is keyed by a hash of the frozen weights themselves, k, the maximum length, the token
ids and the precision they were computed in, so any change of those misses the cache. The cache
has a size budget (``$FTSEARCH_FEATURE_CACHE_GB``, default 8) and evicts least recently used
entries to stay within it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ftsearch import settings
from ftsearch.data.tokens import PadCollator, TokenizedSplit, batched_loader
from ftsearch.errors import FtsearchError
from ftsearch.models.text import frozen_prefix_modules, prefix_hidden_states

BUDGET_ENV = "FTSEARCH_FEATURE_CACHE_GB"
DEFAULT_BUDGET_GB = 8.0
FEATURES_FILE = "features.npy"
INDEX_FILE = "index.npz"


@dataclass(frozen=True)
class FeatureSplit:
    """Hidden states per example (rows ``offsets[i]:offsets[i + 1]`` of ``features``) and labels."""

    features: np.ndarray  # (total tokens, hidden), float16, memory-mapped
    offsets: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def budget_bytes() -> int:
    """The cache's size limit in bytes, from ``$FTSEARCH_FEATURE_CACHE_GB``."""
    raw = os.environ.get(BUDGET_ENV, str(DEFAULT_BUDGET_GB))
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = -1.0
    if gigabytes < 0:
        raise FtsearchError(f"{BUDGET_ENV}={raw!r} is not a size in GB; use a number >= 0 (0 turns the cache off)")
    return int(gigabytes * 1024**3)


def cache_root() -> Path:
    return settings.cache_dir() / "features"


def weights_hash(modules: list[nn.Module]) -> str:
    """A hash of every parameter and buffer of ``modules``: the cache's notion of 'same weights'."""
    digest = hashlib.blake2b(digest_size=16)
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            digest.update(f"{index}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tokens_hash(split: TokenizedSplit) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray([len(ids) for ids in split.ids], dtype=np.int64).tobytes())
    for ids in split.ids:
        digest.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    digest.update(np.asarray(split.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def cache_key(model: nn.Module, depth: int, max_length: int, split: TokenizedSplit, device: torch.device) -> str:
    """The entry's name: frozen weights, depth, max length, token ids, and the compute precision."""
    precision = "cuda-bf16" if device.type == "cuda" else f"{device.type}-fp32"
    weights = weights_hash(frozen_prefix_modules(model, depth))
    return f"d{depth}-len{max_length}-{precision}-{weights[:16]}-{_tokens_hash(split)[:16]}"


def _entry_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _open(folder: Path) -> FeatureSplit:
    os.utime(folder)  # marks it recently used, for eviction
    with np.load(folder / INDEX_FILE) as index:
        offsets, labels = index["offsets"], index["labels"]
    return FeatureSplit(np.load(folder / FEATURES_FILE, mmap_mode="r"), offsets, labels)


def _make_room(root: Path, needed: int, budget: int) -> None:
    """Delete least recently used entries until ``needed`` more bytes fit in ``budget``."""
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    used = sum(_entry_size(p) for p in entries)
    while entries and used + needed > budget:
        oldest = entries.pop(0)
        used -= _entry_size(oldest)
        shutil.rmtree(oldest, ignore_errors=True)


def prefix_features(
    model: nn.Module,
    depth: int,
    split: TokenizedSplit,
    max_length: int,
    pad_id: int,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[FeatureSplit | None, str]:
    """The split's hidden states after the lowest ``depth`` blocks, from the cache or computed now.

    Returns ``(None, why)`` when the entry cannot fit in the cache's budget (the caller then
    trains without the cache), else ``(features, 'hit' | 'computed in N s')``.
    """
    hidden = model.config.hidden_size
    tokens = int(sum(len(ids) for ids in split.ids))
    needed = tokens * hidden * 2 + 16 * (len(split.ids) + 1)
    budget = budget_bytes()
    if needed > budget:
        return None, (f"needs {needed / 1024**3:.2f} GB, more than the cache's budget of {budget / 1024**3:.2f} GB "
                      f"(raise {BUDGET_ENV})")
    root = cache_root()
    folder = root / cache_key(model, depth, max_length, split, device)
    if folder.is_dir():
        return _open(folder), "hit"
    root.mkdir(parents=True, exist_ok=True)
    _make_room(root, needed, budget)
    start = time.monotonic()
    # Written under a private name, then renamed: a concurrent worker never sees a partial entry.
    partial = root / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        offsets = np.cumsum([0] + [len(ids) for ids in split.ids]).astype(np.int64)
        store = np.lib.format.open_memmap(partial / FEATURES_FILE, mode="w+", dtype=np.float16, shape=(tokens, hidden))
        _compute_into(store, offsets, model, depth, split, pad_id, device, batch_size)
        store.flush()
        del store
        np.savez(partial / INDEX_FILE, offsets=offsets, labels=np.asarray(split.labels, dtype=np.int64))
        try:
            os.rename(partial, folder)
        except OSError:  # another worker finished the same entry first; theirs is as good
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return _open(folder), f"computed in {time.monotonic() - start:.0f} s"


def _compute_into(store, offsets, model, depth, split, pad_id, device, batch_size) -> None:
    model.to(device)
    indices = list(range(len(split.ids)))
    loader = DataLoader(indices, batch_size=batch_size, collate_fn=lambda rows: rows)
    collate = PadCollator(pad_id)
    for rows in loader:
        batch = collate([(split.ids[i], 0) for i in rows])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            states = prefix_hidden_states(model, depth, ids, mask)
        states = states.to("cpu", torch.float16).numpy()
        for row, i in enumerate(rows):
            store[offsets[i] : offsets[i + 1]] = states[row, : offsets[i + 1] - offsets[i]]


class _FeatureExamples(Dataset):
    def __init__(self, split: FeatureSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        start, stop = self.split.offsets[index], self.split.offsets[index + 1]
        return self.split.features[start:stop], int(self.split.labels[index])


def _pad_features(batch: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    width = max(len(states) for states, _ in batch)
    hidden = batch[0][0].shape[1]
    # Kept in float16 up to the model, which casts on its own device: half the bytes to copy.
    embeds = np.zeros((len(batch), width, hidden), dtype=np.float16)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, (states, _) in enumerate(batch):
        embeds[row, : len(states)] = states
        mask[row, : len(states)] = 1
    return {
        "inputs_embeds": torch.from_numpy(embeds),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.tensor([label for _, label in batch]),
    }


def feature_loader(split: FeatureSplit, batch_size: int, *, shuffle: bool, seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """Length-grouped, dynamically padded batches of cached hidden states (float16)."""
    return batched_loader(
        _FeatureExamples(split), split.lengths(), batch_size, _pad_features,
        shuffle=shuffle, seed=seed, pin_memory=pin_memory,
    )
